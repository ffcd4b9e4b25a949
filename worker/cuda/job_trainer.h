// A training job on one CUDA device with everything resident: the counterpart of
// engine::Trainer for the GPU. It reads the job's token file, initialises the weights exactly
// as the CPU device does (engine::InitParams from train.seed, or init_from), steps
// CudaTrainer with the CPU trainer's learning-rate schedule, clipping and data order, and
// writes and reads the same checkpoints (Hugging Face directory + optimizer.safetensors).
// Thread-compatible: one thread drives a CudaJobTrainer.
#ifndef LUMEN_WORKER_CUDA_JOB_TRAINER_H_
#define LUMEN_WORKER_CUDA_JOB_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/device.h"
#include "worker/cuda/trainer.h"
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

  // `device` must outlive the trainer. INVALID_ARGUMENT for bad options (naming the field);
  // the data and init_from errors of TokenDataset::Open and LoadWeights; RESOURCE_EXHAUSTED
  // naming the allocation when the job does not fit the device's budget.
  static absl::StatusOr<std::unique_ptr<CudaJobTrainer>> Create(
      const engine::TrainerOptions& options, CudaDevice* device);

  // One optimizer step over train.grad_accum_steps micro-batches, as engine::Trainer::Step.
  // On error the parameters, moments and step counter are unchanged. FAILED_PRECONDITION
  // naming the step when the loss or gradient norm is not finite; INVALID_ARGUMENT for a
  // token id >= vocab_size in the data.
  absl::StatusOr<engine::StepResult> Step();

  // Writes config.json, the fp32 master weights (model.safetensors or shards) and
  // optimizer.safetensors into `dir`, as engine::Trainer::Export.
  absl::Status Export(const std::string& dir);

  // Restores AdamW moments and the step counter from an optimizer.safetensors file.
  absl::Status LoadOptimizerState(const std::string& path);

  int64_t step() const { return step_; }
  // Wall seconds of the last step's device work: from the upload of its token ids to the end
  // of AdamW (the host only waits meanwhile), without reading the token file.
  double last_device_seconds() const { return last_device_seconds_; }
  const engine::TrainerOptions& options() const { return options_; }
  CudaTrainer& trainer() { return *trainer_; }

 private:
  explicit CudaJobTrainer(const engine::TrainerOptions& options) : options_(options) {}

  const engine::TrainerOptions options_;
  std::unique_ptr<engine::TokenDataset> data_;
  std::unique_ptr<CudaTrainer> trainer_;
  std::vector<int32_t> inputs_, targets_;
  int64_t step_ = 0;
  double last_device_seconds_ = 0;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_JOB_TRAINER_H_
