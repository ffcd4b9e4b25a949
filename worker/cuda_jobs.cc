// cuda_jobs.h for builds with the CUDA toolkit.
#include "worker/cuda_jobs.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/cuda/device.h"
#include "worker/cuda/job_trainer.h"
#include "worker/cuda/measure.h"

namespace lumen {
namespace {

// Room CudaDevice keeps for cuBLASLt's workspace inside the budget (CudaDeviceOptions).
constexpr int64_t kGemmWorkspaceBytes = int64_t{32} << 20;

absl::StatusOr<std::unique_ptr<cuda::CudaDevice>> OpenDevice(int index, int64_t budget_bytes) {
  std::string why;
  const int count = cuda::DeviceCount(&why);
  if (count == 0) {
    return absl::FailedPreconditionError(absl::StrCat("no usable CUDA device: ", why));
  }
  if (index < 0 || index >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPU ", index, " does not exist: this machine has ", count,
        " usable CUDA device(s) (worker i drives GPU i; lower lumend --workers)"));
  }
  cuda::CudaDeviceOptions options;
  options.device_index = index;
  options.budget_bytes = budget_bytes;
  options.gemm_workspace_bytes = kGemmWorkspaceBytes;
  absl::StatusOr<std::unique_ptr<cuda::CudaDevice>> device = cuda::CudaDevice::Create(options);
  if (!device.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open GPU ", index, ": ", device.status().message()));
  }
  return device;
}

class CudaDeviceTrainer : public DeviceTrainer {
 public:
  CudaDeviceTrainer(std::unique_ptr<cuda::CudaDevice> device,
                    std::unique_ptr<cuda::CudaJobTrainer> job)
      : device_(std::move(device)), job_(std::move(job)) {}

  absl::StatusOr<engine::OffloadStepResult> Step() override {
    ASSIGN_OR_RETURN(engine::StepResult r, job_->Step());
    engine::OffloadStepResult out;
    static_cast<engine::StepResult&>(out) = r;
    out.device_memory_budget_bytes = device_->budget();
    out.device_memory_peak_bytes = device_->peak();
    out.compute_seconds = job_->last_device_seconds();
    return out;
  }
  absl::Status Export(const std::string& dir) override { return job_->Export(dir); }
  int64_t TrainingStateBytes() const override {
    return cuda::ResidentState::Bytes(job_->options().model);
  }
  bool resident() const override { return true; }
  const std::vector<engine::TraceEvent>& first_step_trace() const override { return trace_; }

 private:
  // In this order: the job, which allocated on the device, is destroyed first.
  std::unique_ptr<cuda::CudaDevice> device_;
  std::unique_ptr<cuda::CudaJobTrainer> job_;
  const std::vector<engine::TraceEvent> trace_;
};

// The options to train with under `budget_bytes`: activations kept when they fit, recomputed
// otherwise; RESOURCE_EXHAUSTED when neither fits.
absl::StatusOr<engine::TrainerOptions> FitToDevice(engine::TrainerOptions options,
                                                   const std::string& worker_name,
                                                   int64_t budget_bytes) {
  for (bool recompute : {false, true}) {
    options.activation_checkpointing = recompute;
    ASSIGN_OR_RETURN(const int64_t need, cuda::CudaJobTrainer::DeviceBytes(options));
    if (need + kGemmWorkspaceBytes <= budget_bytes) return options;
    if (!recompute) continue;
    return absl::ResourceExhaustedError(absl::StrCat(
        "the job needs ", engine::FormatBytes(need + kGemmWorkspaceBytes),
        " of GPU memory with everything resident (training state ",
        engine::FormatBytes(cuda::ResidentState::Bytes(options.model)),
        ", then layer inputs, scratch and the activation gradients of one micro-batch, layers "
        "recomputed in the backward); ", worker_name, "'s budget is ",
        engine::FormatBytes(budget_bytes),
        ". The CUDA device does not yet stream larger models through the memstore: lower "
        "train.micro_batch_size or seq_len, train a smaller model, or start lumend with a "
        "larger --device-memory"));
  }
  return options;  // not reached
}

}  // namespace

absl::StatusOr<CudaDeviceInfo> ProbeCudaDevice(int index, int64_t budget_bytes) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaDevice> device, OpenDevice(index, budget_bytes));
  CudaDeviceInfo info;
  info.description = absl::StrFormat("%s (sm_%d, %.1f GiB)", device->name(),
                                     device->compute_capability(),
                                     static_cast<double>(device->total_memory()) / (1 << 30));
  info.budget_bytes = device->budget();
  return info;
}

absl::StatusOr<ProfileFigures> MeasureCudaDevice(int index) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaDevice> device, OpenDevice(index, 0));
  ASSIGN_OR_RETURN(auto figures, cuda::MeasureDevice(device.get()));
  return ProfileFigures(figures.begin(), figures.end());
}

absl::Status CheckCudaTask(const engine::TrainerOptions& options, const std::string& worker_name,
                           int64_t budget_bytes) {
  return FitToDevice(options, worker_name, budget_bytes).status();
}

absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(
    const engine::TrainerOptions& options, int index, int64_t budget_bytes) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaDevice> device, OpenDevice(index, budget_bytes));
  ASSIGN_OR_RETURN(const engine::TrainerOptions fitted,
                   FitToDevice(options, absl::StrCat("GPU ", index), device->budget()));
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaJobTrainer> job,
                   cuda::CudaJobTrainer::Create(fitted, device.get()));
  return std::make_unique<CudaDeviceTrainer>(std::move(device), std::move(job));
}

}  // namespace lumen
