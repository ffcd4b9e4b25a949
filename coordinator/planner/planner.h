// The placement planner (DESIGN §3, §4): from a model, its batch geometry, a hardware profile
// and N workers it chooses the parallelism (data-parallel, pipeline or hybrid, compared by
// simulating each), the home tier of every tensor class per layer, prefetch distance, buffer
// counts, activation offload and where the optimizer runs; builds the step schedule and
// predicts it with the simulator. Pure functions; thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_PLANNER_H_
#define LUMEN_COORDINATOR_PLANNER_PLANNER_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/planner/hardware_profile.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/schedule.h"
#include "coordinator/planner/simulator.h"

namespace lumen {

struct PlannerOptions {
  // Workers (devices) to plan for; at most the profile's device count.
  int workers = 1;
  // Device memory a worker may use; 0 = the profile's memory × usable_memory_fraction. Set it
  // to plan for a smaller budget (e.g. the CPU device's --device-memory).
  int64_t device_budget_bytes = 0;
  // Prefetch distances tried for the chosen configuration: parameters of layers i+1..i+k load
  // while layer i computes. More hides latency better and costs one layer's buffer each.
  std::vector<int> prefetch_distances = {1, 2, 3};
  // Layers of optimizer state read ahead from NVMe into host staging buffers. More keeps the
  // drives busy through the forward pass at a cost of one layer's master+m+v of host RAM each.
  int optimizer_read_ahead = 4;
  // Restrict the parallelisms evaluated: pipeline stages and micro-batch groups per replica;
  // 0 = evaluate every choice (the default: the planner picks by simulated step time).
  int stages = 0;
  int groups = 0;
  // Micro-batch ring buffers per activation stream on the device when activations live off it.
  int activation_ring = 2;
  // Keep master weights and AdamW moments on NVMe even when host memory could hold them (a
  // node started with --optimizer-state-tier nvme).
  bool optimizer_state_on_nvme = false;
};

// How N workers split the work: `stages` pipeline stages (each owns a contiguous run of layers)
// × `replicas` data-parallel copies; each replica's micro-batches run in `groups` groups
// (layer-wise batching: a fetched layer runs every micro-batch of its group before release).
struct Parallelism {
  int stages = 1;
  int replicas = 1;
  int groups = 1;
  std::string Name() const;  // "data-parallel x8", "pipeline x8, 4 groups", "hybrid 2x4, ..."
};

// Where things live and how they move.
struct Placement {
  // Home tier of each tensor class for each layer (index = ModelDesc::layers index).
  std::array<std::vector<Tier>, kNumTensorClasses> home;
  bool params_resident = false;  // params kept on the device all step (else streamed)
  bool grads_resident = false;   // grads accumulate on the device (else streamed out per layer)
  bool optimizer_on_device = false;  // else the host CPU, next to the state (DESIGN §2.3)
  bool activations_on_device = false;  // else offloaded (home host or NVMe per layer)
  // Offloaded, the way the worker's executor does it: a layer's outputs stay on the device
  // until the next layer has read them and the gradients between layers stay on the device
  // as far as the memory allows, and device memory left over keeps some checkpoints resident
  // (the rest go home once, farthest next use first, and come back once in the backward).
  // False: every checkpoint and gradient streams through ring buffers.
  bool activations_partial = false;
  // Share of the checkpoints that go home when activations_partial (0..1).
  double activation_offload_fraction = 1.0;
  // activations_partial, when the budget cannot hold one group's layer outputs: the share of
  // them (and of the gradients between layers) that goes home and comes back (0..1).
  double interlayer_offload_fraction = 0.0;
  int prefetch_distance = 0;   // 0 when params are resident
  int param_buffers = 0;       // device slots for streamed params (prefetch_distance + 1)
  int grad_buffers = 0;        // device slots for gradients on their way out
  int activation_buffers = 0;  // device micro-batch slots for streamed activations
  int optimizer_read_ahead = 0;  // host slots for optimizer state read from NVMe
};

// Bytes held on one tier, node-wide: homes per tensor class, plus buffers (prefetch slots,
// staging, one micro-batch's working memory).
struct TierUse {
  ClassBytes home{};
  int64_t buffers = 0;
  int64_t capacity = 0;
  int64_t Total() const;
};

// One parallelism the planner evaluated.
struct Candidate {
  Parallelism parallelism;
  bool feasible = false;
  std::string reason;  // why not, when infeasible
  double step_time_s = 0;
  double tokens_per_s = 0;
  std::string binding_resource;
  // Host-link bytes (both directions, all workers) per parameter per step: DESIGN §4's cost.
  double link_bytes_per_param = 0;
};

struct Plan {
  std::string hardware;  // profile name
  int workers = 1;
  int64_t parameters = 0;
  int64_t tokens_per_step = 0;
  int64_t state_bytes = 0;  // params + master + grads + m + v
  int64_t activation_bytes = 0;  // checkpoints of the whole step

  bool fits = false;
  std::string why_not;  // with the numbers, when !fits
  // What to change: when it does not fit, or when a resource other than compute binds.
  std::vector<std::string> suggestions;

  int64_t device_budget_bytes = 0;  // per worker
  int64_t device_peak_bytes = 0;    // the largest worker's planned peak
  int64_t bytes_needed = 0;         // across tiers, node-wide
  int64_t node_capacity_bytes = 0;  // devices + usable host + NVMe

  Parallelism parallelism;
  Placement placement;
  std::array<TierUse, kNumTiers> tiers;
  Schedule schedule;
  SimResult sim;

  double tokens_per_s = 0;
  // Step FLOPs (recompute counted) / (workers × peak FLOP/s × step time).
  double flops_utilization = 0;
  int64_t nvme_bytes_written_per_day = 0;
  std::vector<Candidate> candidates;
};

// Plans `model` on `hw`. Returns a Plan with fits = false (and why_not, suggestions) when the
// job cannot run there; an error only for bad options (INVALID_ARGUMENT naming the option, e.g.
// more workers than the profile's devices) or an internal failure.
absl::StatusOr<Plan> PlanJob(const ModelDesc& model, const HardwareProfile& hw,
                             const PlannerOptions& options);

// OK when the plan fits; else RESOURCE_EXHAUSTED with why_not (for rejecting a job at submit).
absl::Status AdmissionStatus(const Plan& plan);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_PLANNER_H_
