// A node's hardware as the planner and the simulator see it (DESIGN §3): device count, memory
// and FLOP/s, host links, host RAM and bandwidth, NVMe drives, CPU optimizer rate. Profiles are
// YAML files (deploy/hardware/*.yaml, also built into the binary by name). Plain values;
// functions are thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_HARDWARE_PROFILE_H_
#define LUMEN_COORDINATOR_PLANNER_HARDWARE_PROFILE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lumen {

// Rates are in bytes/s and FLOP/s (the YAML file uses GB/s = 1e9 bytes/s and TFLOP/s).
struct DeviceProfile {
  std::string kind;
  int count = 0;
  int64_t memory_bytes = 0;
  // Share of memory_bytes the worker may budget (the rest: runtime context, fragmentation).
  double usable_memory_fraction = 0.9;
  double peak_bf16_flops = 0;
  double peak_fp32_flops = 0;
  // Achieved / peak for the model's large matrix products.
  double matmul_efficiency = 1.0;
  double memory_bandwidth = 0;
  // Host link per direction: peak and achieved / peak.
  double link_peak = 0;
  double link_efficiency = 1.0;
  bool peer_to_peer = false;
  // The CPU device: its compute shares the host's cores with the memstore calls and the host
  // optimizer, which then slow it down. host_call_seconds is the CPU time of one memstore call
  // (measured by the worker). Not in profile files: only the node's measured profile sets them.
  bool shares_host_cpu = false;
  double host_call_seconds = 0;

  int64_t BudgetBytes() const {
    return static_cast<int64_t>(static_cast<double>(memory_bytes) * usable_memory_fraction);
  }
  double LinkBandwidth() const { return link_peak * link_efficiency; }
  double MatmulFlops(bool bf16) const {
    return (bf16 ? peak_bf16_flops : peak_fp32_flops) * matmul_efficiency;
  }
};

struct HostProfile {
  int64_t memory_bytes = 0;
  double usable_memory_fraction = 0.85;
  double memory_peak = 0;
  double memory_efficiency = 1.0;
  // AdamW parameter updates per second on the CPU, all cores (compute side only; the
  // simulator charges the update's memory traffic to host memory bandwidth separately).
  double cpu_optimizer_params_per_s = 0;

  int64_t UsableBytes() const {
    return static_cast<int64_t>(static_cast<double>(memory_bytes) * usable_memory_fraction);
  }
  double MemoryBandwidth() const { return memory_peak * memory_efficiency; }
};

struct NvmeProfile {
  int drives = 0;
  int64_t capacity_per_drive = 0;
  double read_per_drive = 0;   // bytes/s, sustained sequential
  double write_per_drive = 0;  // bytes/s, sustained sequential

  int64_t CapacityBytes() const { return capacity_per_drive * drives; }
};

struct HardwareProfile {
  std::string name;
  // Where it came from: a file path or "built-in NAME".
  std::string source;
  DeviceProfile device;
  HostProfile host;
  NvmeProfile nvme;
};

// Parses a profile. `source` names the file in errors. Unknown fields, missing required fields,
// wrong types and out-of-range values are INVALID_ARGUMENT naming the file, the field path and
// the line: "8x.yaml: device.memmory (line 7): unknown field; known fields: kind, count, ...".
absl::StatusOr<HardwareProfile> ParseHardwareProfile(absl::string_view yaml,
                                                     absl::string_view source);

// Loads `name_or_path`: a built-in profile name ("8x-rtx4090") or a YAML file path. A path that
// cannot be read and is no built-in name is NOT_FOUND listing the built-in names.
absl::StatusOr<HardwareProfile> LoadHardwareProfile(const std::string& name_or_path);

// Names of the profiles built into the binary (deploy/hardware/*.yaml).
std::vector<std::string> BuiltinHardwareProfileNames();

// The profile `lumenctl plan` uses without --hardware.
inline constexpr char kDefaultHardwareProfile[] = "1x-rtx4090";

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_HARDWARE_PROFILE_H_
