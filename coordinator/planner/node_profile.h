// The running node's hardware as measured by its own processes (DESIGN §3 "measure"): the
// workers' device figures and the memstore's tier figures from GetClusterInfo, turned into a
// HardwareProfile the planner and simulator use like a deploy/hardware/*.yaml file
// (`lumenctl plan --hardware node`). Pure function; thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_NODE_PROFILE_H_
#define LUMEN_COORDINATOR_PLANNER_NODE_PROFILE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "coordinator/planner/hardware_profile.h"

namespace lumen {

// From proto/lumen.proto; declared here because its memstore Tier enum clashes with the
// planner's (schedule.h) in files that include both.
class GetClusterInfoReply;
class WorkerInfo;

// The device's training rate for a model of `hidden_size`: the workers measure their engine's
// decoder-layer FLOP/s at a few hidden sizes ("decoder_flops_per_s_h<H>"); this interpolates
// them in log(H) (flat outside the measured range). Falls back to "bf16_gemm_flops" (a CUDA
// worker's large-GEMM rate) and then "fp32_gemm_flops" (a profile cached by an older version)
// when a worker measured no decoder rates. 0 when it has none of them.
double MeasuredDeviceFlops(const WorkerInfo& worker, int64_t hidden_size);

// Device: the node's workers' count (one restarting after a crash too) and the first
// reachable one's budget (all usable), decoder rate for `hidden_size` as both bf16 and fp32
// peak (efficiency 1: it is measured), copy bandwidth, and the link: the link model's rate
// when the workers run one (--link-gbps), else their copy bandwidth.
// Host: the memstore's host tier capacity (all usable), copy bandwidth and AdamW rate. NVMe:
// one drive per memstore NVMe directory with its measured read and write rates.
// FAILED_PRECONDITION when no worker is reachable or has figures, or the memstore reported
// none ("is the node still starting?").
struct NodeProfile {
  HardwareProfile hardware;
  // What the node's workers run with: device budget (lumend --device-memory) and whether
  // optimizer state lives on NVMe (--optimizer-state-tier nvme).
  int64_t device_budget_bytes = 0;
  bool optimizer_state_on_nvme = false;
};
absl::StatusOr<NodeProfile> NodeHardwareProfile(const GetClusterInfoReply& cluster,
                                                int64_t hidden_size);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_NODE_PROFILE_H_
