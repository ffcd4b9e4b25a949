#include "worker/cuda/measure.h"

#include <algorithm>
#include <chrono>
#include <functional>

#include "common/status_macros.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/gemm.h"
#include "worker/cuda/kernels.h"

namespace lumen::cuda {
namespace {

// Seconds of the fastest of 3 runs of `run` (each synchronised on `stream`), after one
// warm-up run.
absl::StatusOr<double> Fastest(cudaStream_t stream, const std::string& op,
                               const std::function<absl::Status()>& run) {
  double best = 0;
  for (int i = 0; i < 4; ++i) {
    const auto start = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(run());
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), op);
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (i == 1 || (i > 1 && s < best)) best = s;
  }
  return best;
}

}  // namespace

absl::StatusOr<std::map<std::string, double>> MeasureDevice(CudaDevice* device) {
  std::map<std::string, double> figures;
  constexpr int64_t kDim = 4096;
  constexpr int64_t kCopyBytes = int64_t{256} << 20;
  {
    const std::string op = "measure: bf16 GEMM";
    cudaStream_t st = device->compute_stream();
    ASSIGN_OR_RETURN(DeviceBuffer init, device->Allocate(4 * kDim * kDim, op));
    ASSIGN_OR_RETURN(DeviceBuffer a, device->Allocate(2 * kDim * kDim, op));
    ASSIGN_OR_RETURN(DeviceBuffer b, device->Allocate(2 * kDim * kDim, op));
    ASSIGN_OR_RETURN(DeviceBuffer d, device->Allocate(2 * kDim * kDim, op));
    RETURN_IF_ERROR(kernels::FillNormal(init.as<float>(), kDim * kDim, 1, 0.02f, st));
    RETURN_IF_ERROR(kernels::F32ToBf16(init.as<float>(), kDim * kDim, a.as<bf16>(), st));
    RETURN_IF_ERROR(kernels::FillNormal(init.as<float>(), kDim * kDim, 2, 0.02f, st));
    RETURN_IF_ERROR(kernels::F32ToBf16(init.as<float>(), kDim * kDim, b.as<bf16>(), st));
    // Ten products per timed run, so launch latency does not count.
    ASSIGN_OR_RETURN(const double s, Fastest(st, op, [&]() -> absl::Status {
                       for (int i = 0; i < 10; ++i) {
                         RETURN_IF_ERROR(device->gemm().Run(
                             false, false, kDim, kDim, kDim, a.as<bf16>(), kDim, b.as<bf16>(),
                             kDim, 0.0f, nullptr, d.get(), kDim, GemmOut::kBf16, st, op));
                       }
                       return absl::OkStatus();
                     }));
    figures["bf16_gemm_flops"] = 10.0 * 2.0 * kDim * kDim * kDim / s;
  }
  {
    const std::string op = "measure: copies";
    ASSIGN_OR_RETURN(PinnedBuffer host, device->AllocatePinned(kCopyBytes, op));
    ASSIGN_OR_RETURN(DeviceBuffer x, device->Allocate(kCopyBytes, op));
    ASSIGN_OR_RETURN(DeviceBuffer y, device->Allocate(kCopyBytes, op));
    std::fill_n(static_cast<char*>(host.get()), kCopyBytes, 1);
    auto copy = [&](void* to, const void* from, cudaMemcpyKind kind, cudaStream_t st) {
      return Fastest(st, op, [&]() -> absl::Status {
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(to, from, kCopyBytes, kind, st), op);
        return absl::OkStatus();
      });
    };
    ASSIGN_OR_RETURN(const double h2d,
                     copy(x.get(), host.get(), cudaMemcpyHostToDevice, device->h2d_stream()));
    ASSIGN_OR_RETURN(const double d2h,
                     copy(host.get(), x.get(), cudaMemcpyDeviceToHost, device->d2h_stream()));
    ASSIGN_OR_RETURN(const double d2d, copy(y.get(), x.get(), cudaMemcpyDeviceToDevice,
                                            device->compute_stream()));
    figures["h2d_bytes_per_s"] = kCopyBytes / h2d;
    figures["d2h_bytes_per_s"] = kCopyBytes / d2h;
    figures["copy_bytes_per_s"] = kCopyBytes / d2d;
  }
  return figures;
}

}  // namespace lumen::cuda
