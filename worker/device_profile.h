// Measures this worker's device as the planner needs it (DESIGN §3): the CPU device's fp32
// matrix-product rate with OpenBLAS and its host<->device copy bandwidth (a memcpy, since its
// "device memory" is host memory). Takes about a second; cache the result (common/profile_cache).
#ifndef LUMEN_WORKER_DEVICE_PROFILE_H_
#define LUMEN_WORKER_DEVICE_PROFILE_H_

#include "absl/status/statusor.h"
#include "common/profile_cache.h"

namespace lumen {

// Figures: "fp32_gemm_flops" (FLOP/s of a 1024^3 sgemm with `threads` threads, best of 3),
// "copy_bytes_per_s" (one-thread memcpy of 64 MiB between pre-faulted buffers, best of 3),
// "threads".
absl::StatusOr<ProfileFigures> MeasureCpuDevice(int threads);

}  // namespace lumen

#endif  // LUMEN_WORKER_DEVICE_PROFILE_H_
