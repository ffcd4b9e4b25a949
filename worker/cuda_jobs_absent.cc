// cuda_jobs.h for builds without the CUDA toolkit (no /usr/local/cuda at build time).
#include "worker/cuda_jobs.h"

namespace lumen {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "this build of Lumen has no CUDA device: it was built on a machine without the CUDA "
      "toolkit (/usr/local/cuda); rebuild where nvcc is installed, or use --device cpu");
}

}  // namespace

absl::StatusOr<CudaDeviceInfo> ProbeCudaDevice(int, int64_t) { return NoCuda(); }

absl::StatusOr<ProfileFigures> MeasureCudaDevice(int) { return NoCuda(); }

absl::Status CheckCudaTask(const engine::TrainerOptions&, const std::string&, int64_t) {
  return NoCuda();
}

absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(const engine::TrainerOptions&,
                                                                 int, int64_t) {
  return NoCuda();
}

}  // namespace lumen
