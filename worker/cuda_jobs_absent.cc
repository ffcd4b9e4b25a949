// cuda_jobs.h for the CPU device's worker binary (`worker`), and for builds without the CUDA
// toolkit: lumend runs `worker_cuda` for --device cuda.
#include "worker/cuda_jobs.h"

namespace lumen {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "this worker binary has no CUDA device: lumend runs worker_cuda for --device cuda, "
      "which only builds made with the CUDA toolkit (/usr/local/cuda) have");
}

}  // namespace

absl::StatusOr<CudaDeviceInfo> ProbeCudaDevice(int, int64_t) { return NoCuda(); }

absl::StatusOr<ProfileFigures> MeasureCudaDevice(int) { return NoCuda(); }

absl::StatusOr<CudaJobMemory> CheckCudaTask(const engine::TrainerOptions&, const std::string&,
                                            int64_t, int64_t, bool, bool) {
  return NoCuda();
}

absl::Status ReplicaDoesNotFit(const engine::TrainerOptions&, const std::string&, int64_t,
                               int64_t) {
  return NoCuda();
}

absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(
    const engine::TrainerOptions&, int, int64_t, engine::TensorHome*, engine::HomeTier, bool,
    const engine::ReplicaOptions&) {
  return NoCuda();
}

}  // namespace lumen
