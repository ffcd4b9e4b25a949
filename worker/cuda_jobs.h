// The worker's CUDA device (lumend --device cuda): worker i drives GPU i. Jobs train with
// everything resident on the GPU (cuda::CudaJobTrainer); a job whose training state does not
// fit the device budget is refused at admission, since streaming through the memstore is built
// for the CPU device only so far. `worker_cuda` links cuda_jobs.cc; `worker` (the CPU device's,
// and the only one in builds without the CUDA toolkit) links cuda_jobs_absent.cc, whose
// functions say it has no CUDA device.
#ifndef LUMEN_WORKER_CUDA_JOBS_H_
#define LUMEN_WORKER_CUDA_JOBS_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/profile_cache.h"
#include "worker/device_trainer.h"
#include "worker/engine/trainer.h"

namespace lumen {

struct CudaDeviceInfo {
  std::string description;  // "NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)"
  int64_t budget_bytes = 0;  // the budget asked for, or the free memory less 1 GiB for 0
};

// Opens GPU `index` with a budget of `budget_bytes` (0: its free memory less 1 GiB).
// FAILED_PRECONDITION saying why it cannot be used: this build has no CUDA, the driver or the
// device is missing.
absl::StatusOr<CudaDeviceInfo> ProbeCudaDevice(int index, int64_t budget_bytes);

// The planner's figures of GPU `index` (cuda::MeasureDevice): "bf16_gemm_flops",
// "h2d_bytes_per_s", "d2h_bytes_per_s", "copy_bytes_per_s".
absl::StatusOr<ProfileFigures> MeasureCudaDevice(int index);

// Whether a job with these options fits a GPU with `budget_bytes` of device memory, keeping
// each layer's activations for the backward when they fit and recomputing them otherwise.
// RESOURCE_EXHAUSTED naming both sizes and what to change when it does not; INVALID_ARGUMENT
// for options the CUDA model refuses.
absl::Status CheckCudaTask(const engine::TrainerOptions& options, const std::string& worker_name,
                           int64_t budget_bytes);

// The job's trainer on GPU `index`, with the device capped at `budget_bytes` (CheckCudaTask's
// choice of kept or recomputed activations).
absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(
    const engine::TrainerOptions& options, int index, int64_t budget_bytes);

}  // namespace lumen

#endif  // LUMEN_WORKER_CUDA_JOBS_H_
