// Training with everything resident on one CUDA device: bf16 compute copies, fp32 master
// weights, fp32 gradients and AdamW moments (ResidentState), and a step driver (CudaTrainer)
// that runs the layer-wise schedule of the CPU trainer over micro-batches with activation
// checkpointing, global-norm clipping and AdamW, with the numerics contract of engine::Trainer
// up to bf16 rounding. Thread-compatible: one thread drives each object.
#ifndef LUMEN_WORKER_CUDA_TRAINER_H_
#define LUMEN_WORKER_CUDA_TRAINER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/device.h"
#include "worker/cuda/layout.h"
#include "worker/cuda/model.h"
#include "worker/engine/collective.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"

namespace lumen::cuda {

// One tensor group on the device (a decoder layer, the embedding, the final norm or the LM
// head): bf16 parameters, fp32 master, gradient, m and v, all of `elems` elements.
struct DeviceTensorGroup {
  int64_t elems = 0;
  DeviceBuffer param, master, grad, m, v;
  std::vector<GroupSegment> segments;
};

// INVALID_ARGUMENT naming `what`[i] for the first id outside [0, vocab).
absl::Status CheckTokenIds(const std::vector<int32_t>& ids, int64_t vocab, const char* what);

class ResidentState {
 public:
  // Allocates everything (op names "resident state: ..."); RESOURCE_EXHAUSTED when it does
  // not fit the device budget.
  static absl::StatusOr<std::unique_ptr<ResidentState>> Create(CudaDevice* device,
                                                               const engine::ModelConfig& config);
  // Bytes of parameters (bf16) + master + gradients + m + v.
  static int64_t Bytes(const engine::ModelConfig& config);

  // Sets master weights and their bf16 copies from `params`; zeroes m, v and the gradients.
  absl::Status Upload(const engine::ModelParams& params);
  // As Upload, from device-side random values: matrices ~ N(0, init_std) (kernels::FillNormal),
  // norm weights 1. For benchmarks: no host copy of the model is needed.
  absl::Status InitRandom(uint64_t seed);
  // fp32 master weights / gradients into `out` (allocated to the config's shapes).
  absl::Status DownloadParams(engine::ModelParams* out);
  absl::Status DownloadGrads(engine::ModelParams* out);
  // AdamW's first and second moments, to and from the host (a checkpoint's optimizer state).
  absl::Status DownloadMoments(engine::ModelParams* m, engine::ModelParams* v);
  absl::Status UploadMoments(const engine::ModelParams& m, const engine::ModelParams& v);
  absl::Status ZeroGrads();
  // Points the model at the resident tensors.
  void Bind(CudaLlama* model);
  // Global L2 norm of the gradients (synchronises the compute stream).
  absl::StatusOr<double> GradNorm();
  // Data parallelism: replaces the gradients by their sums over the replicas of `collective`
  // (through pinned host memory, 4 bytes a parameter allocated at the first call: every
  // gradient is copied out, summed in place, copied back), `loss_sum` by its
  // sum, and returns the norm of the summed gradients, computed on the host in a fixed order so
  // every replica gets the same bits (GradNorm's device reduction adds in no fixed order).
  // `step` is the collective's 0-based step. Synchronises.
  absl::StatusOr<double> SumGradsAcrossReplicas(engine::Collective* collective, int64_t step,
                                                double* loss_sum);
  // AdamW on every tensor (weight decay on matrices only), gradients multiplied by
  // grad_scale first; `step` is 1-based.
  absl::Status AdamWStep(const engine::AdamWHyper& hyper, int64_t step, double grad_scale);

 private:
  ResidentState(CudaDevice* device, const engine::ModelConfig& config)
      : device_(device), config_(config) {}
  // The groups with the host tensors each segment corresponds to.
  std::vector<std::vector<const std::vector<float>*>> HostTensors(
      const engine::ModelParams& p) const;
  // Copies each group's `which` buffer (fp32) into `out`, allocated to the config's shapes
  // when it is not.
  absl::Status Download(DeviceBuffer DeviceTensorGroup::*which, engine::ModelParams* out);
  // Copies `in` into each group's `which` buffer (fp32); INVALID_ARGUMENT on a shape mismatch.
  absl::Status UploadF32(const engine::ModelParams& in, DeviceBuffer DeviceTensorGroup::*which);

  CudaDevice* const device_;
  const engine::ModelConfig config_;
  // layers 0..L-1, then embed_tokens, norm, lm_head (when untied).
  std::vector<DeviceTensorGroup> groups_;
  DeviceBuffer norm_acc_;
  // SumGradsAcrossReplicas' host copy of the gradients: pinned, so the copies run at the
  // link's full rate, and kept from step to step (allocated at the first exchange).
  PinnedBuffer replica_grads_;
};

struct CudaStepResult {
  double loss = 0;       // mean token loss over the step's micro-batches
  double grad_norm = 0;  // before clipping
};

// In-memory training of one model on one device.
class CudaTrainer {
 public:
  // `device` must outlive the trainer. Allocates the state, the checkpoints of every layer
  // input for one micro-batch and the scratch.
  static absl::StatusOr<std::unique_ptr<CudaTrainer>> Create(CudaDevice* device,
                                                             const engine::ModelConfig& config,
                                                             int64_t batch, int64_t seq,
                                                             const CudaLlamaOptions& options = {});
  // Device bytes Create allocates for this shape (state, activation checkpoints, activation
  // gradients, scratch; not the token ids of a step nor the device's GEMM workspace).
  // INVALID_ARGUMENT for a config CudaLlama refuses.
  static absl::StatusOr<int64_t> DeviceBytes(const engine::ModelConfig& config, int64_t batch,
                                             int64_t seq, const CudaLlamaOptions& options = {});
  ResidentState& state() { return *state_; }
  CudaLlama& model() { return *model_; }
  // Makes this trainer one replica of a job on several workers (engine::ReplicaOptions): Step's
  // micro-batches are then its share, scaled as a part of replica.global_micro_batches, and its
  // gradients and loss are summed with the other replicas' before the norm; the result reports
  // the whole step's loss.
  void SetReplica(const engine::ReplicaOptions& replica) { replica_ = replica; }

  // One optimizer step over inputs/targets of micro_batches * batch * seq ids (host memory,
  // micro-batch after micro-batch): per micro-batch forward / head / backward with
  // grad_scale 1/micro_batches, then clipping to max_grad_norm (<= 0: none) and AdamW with
  // `hyper` (its weight_decay applies to matrices) at 1-based `step`. INVALID_ARGUMENT for an
  // id outside [0, vocab).
  absl::StatusOr<CudaStepResult> Step(const std::vector<int32_t>& inputs,
                                      const std::vector<int32_t>& targets,
                                      int64_t micro_batches, const engine::AdamWHyper& hyper,
                                      double max_grad_norm, int64_t step);
  // Forward + head + backward of one micro-batch into the gradients (no optimizer); returns
  // the mean token loss. Synchronises.
  absl::StatusOr<double> ForwardBackward(const int32_t* inputs, const int32_t* targets,
                                         float grad_scale);

 private:
  CudaTrainer() = default;
  absl::Status RunMicroBatch(const int32_t* inputs, const int32_t* targets, float grad_scale);

  CudaDevice* device_ = nullptr;
  engine::ReplicaOptions replica_;
  int64_t batch_ = 0, seq_ = 0;
  std::unique_ptr<CudaLlama> model_;
  std::unique_ptr<ResidentState> state_;
  DeviceBuffer checkpoints_;  // (layers + 1) x [batch*seq, hidden] bf16
  DeviceBuffer dx_a_, dx_b_;
  DeviceBuffer ids_;  // inputs then targets, int32
  DeviceBuffer loss_sum_;
  PinnedBuffer ids_host_;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_TRAINER_H_
