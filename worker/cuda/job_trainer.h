// A training job on one CUDA device: the counterpart of engine::Trainer for the GPU. It reads
// the job's token file, initialises the weights exactly as the CPU device does
// (engine::InitParams from train.seed, or init_from), steps with the CPU trainer's
// learning-rate schedule, clipping and data order, and writes and reads the same checkpoints
// (Hugging Face directory + optimizer.safetensors). Everything stays on the device
// (CudaTrainer), or, for a job larger than the device, streams through host memory
// (CudaOffloadTrainer). Thread-compatible: one thread drives a CudaJobTrainer.
#ifndef LUMEN_WORKER_CUDA_JOB_TRAINER_H_
#define LUMEN_WORKER_CUDA_JOB_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/device.h"
#include "worker/cuda/offload_trainer.h"
#include "worker/cuda/trainer.h"
#include "worker/engine/collective.h"
#include "worker/engine/data.h"
#include "worker/engine/trainer.h"

namespace lumen::cuda {

class CudaJobTrainer {
 public:
  // The model options a job's trainer options give: layer activations are kept for the
  // backward unless options.activation_checkpointing.
  static CudaLlamaOptions ModelOptions(const engine::TrainerOptions& options);

  // Device bytes the job needs (CudaTrainer::DeviceBytes for its micro-batch, plus the token
  // ids of one step). INVALID_ARGUMENT for options either trainer refuses.
  static absl::StatusOr<int64_t> DeviceBytes(const engine::TrainerOptions& options);

  // The offloaded trainer's shape for a job: one micro-batch of train.micro_batch_size x seq_len
  // tokens, train.grad_accum_steps of them a step.
  static CudaOffloadOptions OffloadOptions(const engine::TrainerOptions& options,
                                           const StateHome& state_home = {},
                                           bool speculate = false);
  // Device and host bytes the offloaded job needs (CudaOffloadTrainer::WorkingSetBytes, and
  // HostBytes plus the fp32 copies of one tensor group's initial weights or of its two moments
  // that starting or checkpointing makes, a group at a time), with the master weights and
  // moments in this process or in a home, and with a second generation when speculating
  // (CudaOffloadOptions::speculate). INVALID_ARGUMENT as DeviceBytes.
  static absl::StatusOr<int64_t> OffloadDeviceBytes(const engine::TrainerOptions& options);
  static absl::StatusOr<int64_t> OffloadHostBytes(const engine::TrainerOptions& options,
                                                  bool state_at_home = false,
                                                  bool speculate = false);

  // `device` must outlive the trainer; `offload`: stream through host memory, with the fp32
  // master weights and AdamW's moments in `state_home` (default: this process' memory),
  // speculating AdamW during the backward when `speculate` (CudaOffloadOptions::speculate).
  // `replica`: one replica of a job on several workers (engine::ReplicaOptions;
  // options.train.grad_accum_steps is its share), resident only (FAILED_PRECONDITION with
  // `offload`). INVALID_ARGUMENT for bad options (naming the field); the data and init_from
  // errors of TokenDataset::Open and LoadWeights; RESOURCE_EXHAUSTED naming the allocation when
  // the job does not fit the device's budget (or, offloaded, pinned host memory).
  static absl::StatusOr<std::unique_ptr<CudaJobTrainer>> Create(
      const engine::TrainerOptions& options, CudaDevice* device, bool offload = false,
      const StateHome& state_home = {}, bool speculate = false,
      const engine::ReplicaOptions& replica = {});

  // One optimizer step over train.grad_accum_steps micro-batches, as engine::Trainer::Step (a
  // replica: its share of the step, reporting the whole step's loss and tokens).
  // On error the step counter is unchanged, and so are the parameters and moments, except
  // when offloaded without clipping (grad_clip 0), where the layers whose AdamW had started are
  // updated: the job should end there, its last checkpoint intact. FAILED_PRECONDITION
  // naming the step when the loss or gradient norm is not finite; INVALID_ARGUMENT for a
  // token id >= vocab_size in the data.
  absl::StatusOr<engine::StepResult> Step();

  // Writes config.json, the fp32 master weights (model.safetensors or shards) and
  // optimizer.safetensors into `dir`, as engine::Trainer::Export.
  absl::Status Export(const std::string& dir);

  // The fp32 master weights now (after every update in flight).
  absl::Status GetParams(engine::ModelParams* out);

  // Restores AdamW moments and the step counter from an optimizer.safetensors file.
  absl::Status LoadOptimizerState(const std::string& path);

  int64_t step() const { return step_; }
  bool offloaded() const { return offload_ != nullptr; }
  // Bytes copied between host and device in the last step (0 when resident), and seconds the
  // host waited in it for host AdamW before it could issue more device work.
  int64_t last_bytes_home_to_device() const { return last_.bytes_home_to_device; }
  int64_t last_bytes_device_to_home() const { return last_.bytes_device_to_home; }
  double last_optimizer_wait_seconds() const {
    return last_.wait_optimizer_layers_s + last_.wait_optimizer_embed_head_s;
  }
  // Offloaded: whether the last step's AdamW of the decoder layers overlapped its backward and
  // was kept (CudaOffloadStepResult::optimizer_overlapped).
  bool last_optimizer_overlapped() const { return last_.optimizer_overlapped; }
  // Seconds the device computed in the last step: offloaded, from timed events around its
  // kernels; resident, last_device_seconds() (nothing waits between its kernels).
  double last_compute_seconds() const {
    return offload_ != nullptr ? last_.compute_seconds : last_device_seconds_;
  }
  // Wall seconds of the last step's device work without reading the token file: resident,
  // from the upload of its token ids to the end of AdamW (the host only waits meanwhile);
  // offloaded, until its loss and norm are known (its AdamW continues into the next step).
  double last_device_seconds() const { return last_device_seconds_; }
  const engine::TrainerOptions& options() const { return options_; }

 private:
  explicit CudaJobTrainer(const engine::TrainerOptions& options) : options_(options) {}

  const engine::TrainerOptions options_;
  engine::ReplicaOptions replica_;
  std::unique_ptr<engine::TokenDataset> data_;
  // One of the two.
  std::unique_ptr<CudaTrainer> trainer_;
  std::unique_ptr<CudaOffloadTrainer> offload_;
  std::vector<int32_t> inputs_, targets_, next_inputs_, next_targets_;
  int64_t next_step_ = -1;  // the step whose batch next_inputs_/next_targets_ hold, or -1
  CudaOffloadStepResult last_;
  int64_t step_ = 0;
  double last_device_seconds_ = 0;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_JOB_TRAINER_H_
