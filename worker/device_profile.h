// Measures this worker's device as the planner needs it (DESIGN §3): the CPU device's fp32
// matrix-product rate with OpenBLAS and its host<->device copy bandwidth (a memcpy, since its
// "device memory" is host memory). Takes about a second; cache the result (common/profile_cache).
#ifndef LUMEN_WORKER_DEVICE_PROFILE_H_
#define LUMEN_WORKER_DEVICE_PROFILE_H_

#include "absl/status/statusor.h"
#include <string>

#include "common/profile_cache.h"
#include "memstore/memstore_client.h"

namespace lumen {

// Figures: "fp32_gemm_flops" (FLOP/s of a 1024^3 sgemm with `threads` threads, best of 3),
// "copy_bytes_per_s" (one-thread memcpy of 64 MiB between pre-faulted buffers, best of 3),
// "threads", and "decoder_flops_per_s_h<H>" for H in kProfiledHiddenSizes: the rate this
// engine trains one Llama decoder layer of hidden size H (intermediate 11H/4, head dim 64,
// 256 tokens), forward plus recomputing backward, counted as the planner counts FLOPs
// (coordinator/planner/model_desc.cc: 4 x (2 x matrix parameters + 2 x seq x H) per token).
// The planner interpolates these for a job's hidden size: a measured rate at the model's
// shapes, attention and small ops included.
inline constexpr int kProfiledHiddenSizes[] = {128, 256, 512, 1024};
absl::StatusOr<ProfileFigures> MeasureCpuDevice(int threads);

// One small write or read of a tensor through the memstore (the control-plane round trips an
// offloaded job pays per tensor moved), over 400 calls on a 1 KiB tensor named
// "<worker>/profile" (freed afterwards): "memstore_call_seconds" (wall time per call) and
// "memstore_call_cpu_seconds" (CPU time per call of both processes: this process's, doubled
// on the assumption that the memstore's side of a gRPC round trip costs about as much; at
// most the wall time). On a CPU device that CPU time comes out of the device's compute.
absl::StatusOr<ProfileFigures> MeasureMemstoreCall(MemstoreClient* memstore,
                                                   const std::string& worker);

}  // namespace lumen

#endif  // LUMEN_WORKER_DEVICE_PROFILE_H_
