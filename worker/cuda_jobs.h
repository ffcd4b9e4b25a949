// The worker's CUDA device (lumend --device cuda): worker i drives GPU i. Jobs train with
// everything resident on the GPU when they fit its budget, and otherwise stream through the
// worker's host memory (cuda::CudaJobTrainer over cuda::CudaOffloadTrainer): bf16 weights and
// fp32 gradients in host RAM, the fp32 master weights and AdamW's moments there too or in the
// memstore (--optimizer-state-tier nvme), and the GPU holds two layers at a time.
// `worker_cuda` links cuda_jobs.cc; `worker` (the CPU device's, and the only one in builds
// without the CUDA toolkit) links cuda_jobs_absent.cc, whose functions say it has no CUDA
// device.
#ifndef LUMEN_WORKER_CUDA_JOBS_H_
#define LUMEN_WORKER_CUDA_JOBS_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/profile_cache.h"
#include "worker/device_trainer.h"
#include "worker/engine/collective.h"
#include "worker/engine/tensor_home.h"
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

// CheckCudaTask's host_bytes: the host's MemAvailable now.
inline constexpr int64_t kHostBytesAvailable = -2;

// How a job would use memory on a CUDA worker.
struct CudaJobMemory {
  bool streamed = false;  // through host memory (otherwise everything on the GPU)
  // Streamed with the master weights and AdamW's moments in the memstore: their bytes there
  // (0 otherwise).
  int64_t state_home_bytes = 0;
  // Streamed: the host memory this process takes for the job's state (0 when resident).
  int64_t host_bytes = 0;
};

// Whether a job with these options can run on a GPU with `budget_bytes` of device memory:
// resident, keeping each layer's activations for the backward when they fit and recomputing
// them otherwise; else streamed through host memory, when its working set fits the GPU and its
// state `host_bytes` (-1: not checked), with the master weights and AdamW's moments in the
// memstore when `state_in_memstore` (whose room the caller checks). `overlap_backward` (lumend
// --optimizer-overlap backward): a streamed job that clips updates each layer during the
// backward beside its current weights and moments (12 more bytes per parameter, all but the
// embedding's, of host memory, or of the memstore's NVMe tier with the state there).
// RESOURCE_EXHAUSTED naming the sizes and what to change when nothing fits; INVALID_ARGUMENT
// for options the CUDA model refuses.
absl::StatusOr<CudaJobMemory> CheckCudaTask(const engine::TrainerOptions& options,
                                            const std::string& worker_name,
                                            int64_t budget_bytes,
                                            int64_t host_bytes = kHostBytesAvailable,
                                            bool state_in_memstore = false,
                                            bool overlap_backward = false);

// RESOURCE_EXHAUSTED for a replica of a job on `workers` GPUs that does not fit `budget_bytes`
// resident (CheckCudaTask chose to stream it), naming resources.workers and the sizes.
absl::Status ReplicaDoesNotFit(const engine::TrainerOptions& options,
                               const std::string& worker_name, int64_t budget_bytes,
                               int64_t workers);

// The job's trainer on GPU `index`, with the device capped at `budget_bytes` (CheckCudaTask's
// choice of resident with kept or recomputed activations, or streamed). Streamed, the fp32
// master weights and AdamW's moments go to `state_home` (in `state_tier`, as tensors
// "optimizer/{master,m,v}/<group>/<chunk>", which the caller frees) when it is not null, else
// stay in this process. `replica`: one replica of a job on several workers
// (engine::ReplicaOptions), which must fit resident (RESOURCE_EXHAUSTED naming
// resources.workers otherwise).
absl::StatusOr<std::unique_ptr<DeviceTrainer>> CreateCudaTrainer(
    const engine::TrainerOptions& options, int index, int64_t budget_bytes,
    engine::TensorHome* state_home = nullptr,
    engine::HomeTier state_tier = engine::HomeTier::kNvme, bool overlap_backward = false,
    const engine::ReplicaOptions& replica = {});

}  // namespace lumen

#endif  // LUMEN_WORKER_CUDA_JOBS_H_
