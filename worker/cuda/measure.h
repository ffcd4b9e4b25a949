// Measures one CUDA device as the planner needs it (DESIGN §3), in about a second: its bf16
// matrix-product rate with cuBLASLt, and the bandwidth of pinned host<->device copies and of
// copies inside device memory. Thread-compatible; nothing else should use the device meanwhile.
#ifndef LUMEN_WORKER_CUDA_MEASURE_H_
#define LUMEN_WORKER_CUDA_MEASURE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "worker/cuda/device.h"

namespace lumen::cuda {

// Figures (best of 3 after a warm-up):
//   "bf16_gemm_flops": FLOP/s of a 4096^3 bf16 x bf16 -> bf16 product with fp32 accumulation;
//   "h2d_bytes_per_s" / "d2h_bytes_per_s": a 256 MiB copy between pinned host memory and the
//     device on the copy streams;
//   "copy_bytes_per_s": a 256 MiB device-to-device copy (bytes read, as the CPU device counts
//     its memcpy).
// Needs about 1 GiB of the device's budget; RESOURCE_EXHAUSTED naming the buffer otherwise.
absl::StatusOr<std::map<std::string, double>> MeasureDevice(CudaDevice* device);

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_MEASURE_H_
