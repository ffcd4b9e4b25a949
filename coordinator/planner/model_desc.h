// What the planner knows about a model (DESIGN §3 "inputs"): per layer the bytes of each tensor
// class and the FLOPs per token, derived from a job spec. Plain values; functions thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_MODEL_DESC_H_
#define LUMEN_COORDINATOR_PLANNER_MODEL_DESC_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/job.pb.h"

namespace lumen {

// The tensor classes of DESIGN §2, each given a home tier by the planner.
enum class TensorClass {
  kParams = 0,     // compute copy, in the compute precision
  kMaster = 1,     // fp32 master weights (none in fp32 precision: the compute copy is it)
  kGrads = 2,      // gradients, compute precision
  kAdamM = 3,      // fp32
  kAdamV = 4,      // fp32
  kActivations = 5,  // checkpoints: each layer's input, every micro-batch of the step
};
inline constexpr int kNumTensorClasses = 6;
const char* TensorClassName(TensorClass c);  // "params", "master", "grads", "adam_m", ...

using ClassBytes = std::array<int64_t, kNumTensorClasses>;

enum class LayerKind { kEmbedding, kDecoder, kHead };

struct LayerDesc {
  std::string name;  // "embed", "layers.0" ... "layers.N-1", "head" (final norm + LM head)
  LayerKind kind = LayerKind::kDecoder;
  int64_t parameters = 0;
  // Bytes per tensor class for the whole step; kActivations counts every micro-batch of the
  // step (micro_batch_size × grad_accum_steps sequences).
  ClassBytes bytes{};
  // Bytes a compute op needs on the device to run this layer beyond its own parameters:
  // a tied LM head reads the embedding matrix.
  int64_t shared_param_bytes = 0;
  // Checkpoint (layer input) bytes of one micro-batch.
  int64_t activation_bytes_per_micro_batch = 0;
  // Peak intermediate bytes of one micro-batch's recompute + backward through the layer.
  int64_t working_bytes_per_micro_batch = 0;
  // Forward FLOPs per token (matrix products and attention scores); the backward pass with
  // recompute is 3× this (recompute 1×, backward 2×).
  double forward_flops_per_token = 0;
  // Tensors its parameters are stored as (a decoder layer: 9); each crosses the host link as a
  // separate transfer.
  int tensors = 1;
};

struct ModelDesc {
  int64_t parameters = 0;
  bool bf16 = false;
  int64_t compute_bytes = 4;  // bytes of one compute-precision element
  int64_t micro_batch_size = 1;
  int64_t seq_len = 1;
  int64_t micro_batches = 1;  // grad_accum_steps: micro-batches per step, all workers together
  int64_t hidden_size = 0;
  std::vector<LayerDesc> layers;  // embed, decoder layers, head

  int64_t TokensPerStep() const { return micro_batch_size * seq_len * micro_batches; }
  ClassBytes TotalBytes() const;
  // Params + master + grads + m + v (no activations): ~16 B/param in bf16 and in fp32.
  int64_t StateBytes() const;
  // FLOPs of one step (forward + recompute + backward) over all tokens.
  double StepFlops() const;
  // Host memory traffic of one AdamW update, bytes per parameter (read grad, master, m, v;
  // write master, m, v and the compute copy).
  int64_t OptimizerBytesPerParam() const;
};

// Describes the model of a job spec whose presets and defaults are applied (an unset
// precision is fp32).
ModelDesc DescribeModel(const JobSpec& spec);

// The precision a job trains in on a device: the spec's, or where it leaves it out the
// device's own, as a node resolves it (coordinator/job_spec.h): fp32 on a CPU device (one that
// shares the host's cores), bf16 on a GPU.
Precision PlanningPrecision(const JobSpec& spec, bool device_shares_host_cpu);

// Parses a job spec for planning: YAML → JobSpec, model preset, defaults, and the model and
// batch checks of ResolveJobSpec — but not the data file, init_from or this node's limits
// (planning is for hardware the user may not have). resources.precision stays unset when the
// spec leaves it out: it is the device's (PlanningPrecision). Errors are INVALID_ARGUMENT naming
// the field.
absl::StatusOr<JobSpec> ParseJobSpecForPlanning(absl::string_view yaml);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_MODEL_DESC_H_
