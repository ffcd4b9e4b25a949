// What running a job needs from the trainer of a worker's device, so RunTask drives the CPU
// device (engine::OffloadTrainer) and a CUDA device (cuda::CudaJobTrainer) the same way.
#ifndef LUMEN_WORKER_DEVICE_TRAINER_H_
#define LUMEN_WORKER_DEVICE_TRAINER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/offload_trainer.h"

namespace lumen {

class DeviceTrainer {
 public:
  virtual ~DeviceTrainer() = default;

  // One optimizer step. Fields a device does not measure stay 0 (bytes moved and stalls on a
  // device that keeps everything resident).
  virtual absl::StatusOr<engine::OffloadStepResult> Step() = 0;
  // Steps done: 0 for a new job, the checkpoint's step for one continued from a checkpoint
  // (engine::TrainerOptions::optimizer_state_from).
  virtual int64_t step() const = 0;
  // Writes a checkpoint (Hugging Face directory and optimizer.safetensors) into `dir`.
  virtual absl::Status Export(const std::string& dir) = 0;
  // Bytes of parameters, gradients and AdamW state.
  virtual int64_t TrainingStateBytes() const = 0;
  // Whether everything stays on the device (nothing streams through host memory or the
  // memstore).
  virtual bool resident() const = 0;
  // The first step's ops, for trace-step-1.json; empty when the device records none.
  virtual const std::vector<engine::TraceEvent>& first_step_trace() const = 0;
};

}  // namespace lumen

#endif  // LUMEN_WORKER_DEVICE_TRAINER_H_
