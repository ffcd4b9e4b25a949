// Discrete-event simulation of one step's schedule on a hardware profile (DESIGN §3
// "predict"). Resources: each worker's compute, its host link per direction, host memory
// bandwidth (shared by every transfer, activation stream and the CPU optimizer, so GPUs contend
// for it), each NVMe drive (reads and writes share a drive; tensors are striped over all
// drives), the CPU optimizer. Ops that run at once share a resource by weighted max-min
// fairness (a fluid model): each op progresses at the rate its most contended resource allows.
// Pure function; thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_SIMULATOR_H_
#define LUMEN_COORDINATOR_PLANNER_SIMULATOR_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/planner/hardware_profile.h"
#include "coordinator/planner/schedule.h"

namespace lumen {

struct ResourceUsage {
  std::string name;   // "worker-0 compute", "worker-0 link h2d", "host memory", "nvme-2", ...
  std::string group;  // "device compute", "host link h2d", "host link d2h", "host memory",
                      // "nvme", "cpu optimizer"
  double busy_s = 0;
  double busy_fraction = 0;  // busy_s / step time
};

struct SimResult {
  double step_time_s = 0;
  std::vector<ResourceUsage> resources;
  // The resource group with the highest busy fraction (its busiest member), and that fraction.
  std::string binding_resource;
  double binding_busy_fraction = 0;
  // Mean over workers of the compute busy fraction.
  double device_busy_fraction = 0;
  // Bytes moved by tier pair: "host->device", "device->host", "nvme->host", "host->nvme".
  std::map<std::string, int64_t> bytes_moved;
  int64_t nvme_bytes_read = 0;
  int64_t nvme_bytes_written = 0;
  // Per op (indexed by Op::id).
  std::vector<double> op_start_s;
  std::vector<double> op_end_s;
};

// Simulates `schedule` (ops of workers 0..num_workers-1 and the host) on `hw`, computing in
// bf16 or fp32. Errors: INVALID_ARGUMENT for an op naming a worker the profile lacks or a
// dependency on a missing op; FAILED_PRECONDITION naming a stuck op when the schedule
// deadlocks (a dependency cycle, or a dependency on an op queued behind it on its lane).
absl::StatusOr<SimResult> Simulate(const Schedule& schedule, const HardwareProfile& hw,
                                   bool bf16);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_SIMULATOR_H_
