// cuda_jobs.h for builds with the CUDA toolkit.
#include "worker/cuda_jobs.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/host_memory.h"
#include "common/status_macros.h"
#include "worker/cuda/device.h"
#include "worker/cuda/host_state.h"
#include "worker/cuda/job_trainer.h"
#include "worker/cuda/measure.h"
#include "worker/cuda/model.h"

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
    out.compute_seconds = job_->last_compute_seconds();
    out.bytes_home_to_device = job_->last_bytes_home_to_device();
    out.bytes_device_to_home = job_->last_bytes_device_to_home();
    out.stall_optimizer_seconds = job_->last_optimizer_wait_seconds();
    out.optimizer_overlap_kept = job_->last_optimizer_overlapped();
    return out;
  }
  int64_t step() const override { return job_->step(); }
  absl::Status Export(const std::string& dir) override { return job_->Export(dir); }
  int64_t TrainingStateBytes() const override {
    return cuda::ResidentState::Bytes(job_->options().model);
  }
  bool resident() const override { return !job_->offloaded(); }
  const std::vector<engine::TraceEvent>& first_step_trace() const override { return trace_; }

 private:
  // In this order: the job, which allocated on the device, is destroyed first.
  std::unique_ptr<cuda::CudaDevice> device_;
  std::unique_ptr<cuda::CudaJobTrainer> job_;
  const std::vector<engine::TraceEvent> trace_;
};

// How a job runs on a GPU.
struct CudaPlan {
  engine::TrainerOptions options;  // activation_checkpointing set when resident
  bool offload = false;
  int64_t host_bytes = 0;  // streamed: the state's host memory
};

// Whether a streamed job updates during the backward beside its current state (a second
// generation, in this process or in the memstore with the first): asked for, and with
// clipping to speculate about (without, the update runs in place during the backward anyway).
bool Speculates(const engine::TrainerOptions& options, bool overlap_backward) {
  return overlap_backward && options.optimizer.grad_clip > 0;
}

// The way to train under `budget_bytes`: everything resident with activations kept when that
// fits, then with layers recomputed, then streamed through host memory (`host_bytes` of it
// free; < 0: not checked; master weights and AdamW's moments elsewhere when `state_at_home`);
// RESOURCE_EXHAUSTED naming the sizes when none fits.
absl::StatusOr<CudaPlan> FitToDevice(engine::TrainerOptions options,
                                     const std::string& worker_name, int64_t budget_bytes,
                                     int64_t host_bytes, bool state_at_home, bool speculate) {
  RETURN_IF_ERROR(cuda::CheckCudaModelConfig(options.model));
  CudaPlan plan;
  int64_t resident = 0;
  for (bool recompute : {false, true}) {
    options.activation_checkpointing = recompute;
    ASSIGN_OR_RETURN(resident, cuda::CudaJobTrainer::DeviceBytes(options));
    if (resident + kGemmWorkspaceBytes <= budget_bytes) {
      plan.options = options;
      return plan;
    }
  }
  ASSIGN_OR_RETURN(const int64_t working, cuda::CudaJobTrainer::OffloadDeviceBytes(options));
  ASSIGN_OR_RETURN(const int64_t host,
                   cuda::CudaJobTrainer::OffloadHostBytes(options, state_at_home, speculate));
  const std::string resident_need = absl::StrCat(
      "the job needs ", engine::FormatBytes(resident + kGemmWorkspaceBytes),
      " of GPU memory with everything resident (training state ",
      engine::FormatBytes(cuda::ResidentState::Bytes(options.model)),
      ", then layer inputs, scratch and the activation gradients of one micro-batch, layers "
      "recomputed in the backward)");
  if (working + kGemmWorkspaceBytes > budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        resident_need, ", and ", engine::FormatBytes(working + kGemmWorkspaceBytes),
        " streamed through host memory (two layers, the embedding or head, two activation "
        "sets of every micro-batch and the head's scratch); ", worker_name, "'s budget is ",
        engine::FormatBytes(budget_bytes),
        ". Lower train.micro_batch_size, grad_accum_steps or seq_len, or start lumend with a "
        "larger --device-memory"));
  }
  if (host_bytes >= 0 && host > host_bytes) {
    const bool second_in_host = speculate && !state_at_home;
    return absl::ResourceExhaustedError(absl::StrCat(
        resident_need, "; streamed, it needs ", engine::FormatBytes(host),
        state_at_home ? " of host memory (bf16 weights, fp32 gradients, the step's layer "
                        "inputs)"
                      : " of host memory (bf16 weights, fp32 gradients, master weights and "
                        "AdamW moments, the step's layer inputs)",
        second_in_host ? " with a second generation of master weights and moments for "
                         "--optimizer-overlap backward"
                       : "",
        " and this node has ", engine::FormatBytes(host_bytes), " available. Train a smaller "
        "model or lower grad_accum_steps or seq_len",
        second_in_host ? ", or use --optimizer-overlap forward" : "",
        state_at_home ? ""
                      : ", or keep the master weights and moments on NVMe "
                        "(--optimizer-state-tier nvme)"));
  }
  options.activation_checkpointing = true;
  plan.options = options;
  plan.offload = true;
  plan.host_bytes = host;
  return plan;
}

}  // namespace

absl::Status ReplicaDoesNotFit(const engine::TrainerOptions& options,
                               const std::string& worker_name, int64_t budget_bytes,
                               int64_t workers) {
  engine::TrainerOptions recompute = options;
  recompute.activation_checkpointing = true;
  absl::StatusOr<int64_t> resident = cuda::CudaJobTrainer::DeviceBytes(recompute);
  return absl::ResourceExhaustedError(absl::StrCat(
      "resources.workers: ", workers, ": each GPU keeps a whole replica of the training state, ",
      resident.ok() ? engine::FormatBytes(*resident + kGemmWorkspaceBytes) : "more than it has",
      " of GPU memory with ", options.train.grad_accum_steps, " micro-batches a step and layers "
      "recomputed; ", worker_name, "'s budget is ", engine::FormatBytes(budget_bytes),
      ". Data parallelism with the state streamed through host memory is not built yet: use "
      "resources.workers: 1 to train it streamed"));
}

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

absl::StatusOr<CudaJobMemory> CheckCudaTask(const engine::TrainerOptions& options,
                                            const std::string& worker_name,
                                            int64_t budget_bytes, int64_t host_bytes,
                                            bool state_in_memstore, bool overlap_backward) {
  if (host_bytes == kHostBytesAvailable) host_bytes = AvailableHostBytes();
  ASSIGN_OR_RETURN(const CudaPlan plan,
                   FitToDevice(options, worker_name, budget_bytes, host_bytes,
                               state_in_memstore,
                               Speculates(options, overlap_backward)));
  CudaJobMemory memory;
  memory.streamed = plan.offload;
  memory.host_bytes = plan.host_bytes;
  if (plan.offload && state_in_memstore) {
    memory.state_home_bytes = cuda::HostTrainingState::HomeBytes(
        options.model, Speculates(options, overlap_backward));
  }
  return memory;
}

absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(
    const engine::TrainerOptions& options, int index, int64_t budget_bytes,
    engine::TensorHome* state_home, engine::HomeTier state_tier, bool overlap_backward,
    const engine::ReplicaOptions& replica) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaDevice> device, OpenDevice(index, budget_bytes));
  const bool speculate = Speculates(options, overlap_backward);
  ASSIGN_OR_RETURN(const CudaPlan plan,
                   FitToDevice(options, absl::StrCat("GPU ", index), device->budget(),
                               AvailableHostBytes(), state_home != nullptr, speculate));
  if (replica.collective != nullptr && plan.offload) {
    return ReplicaDoesNotFit(options, absl::StrCat("GPU ", index), device->budget(),
                             replica.collective->size());
  }
  cuda::StateHome home;
  home.home = state_home;
  home.prefix = "optimizer/";
  home.tier = state_tier;
  home.freed_by_owner = true;  // RunTask frees the job's tensors in one call
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaJobTrainer> job,
                   cuda::CudaJobTrainer::Create(plan.options, device.get(), plan.offload,
                                                home, speculate, replica));
  return std::make_unique<CudaDeviceTrainer>(std::move(device), std::move(job));
}

}  // namespace lumen
