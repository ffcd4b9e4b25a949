// Conversion of CUDA runtime and cuBLAS errors to absl::Status at the library boundary.
// Every CUDA call in worker/cuda goes through one of these macros, so an error names the call,
// the op it was made for and CUDA's own message. Header-only; thread-safe.
#ifndef LUMEN_WORKER_CUDA_CUDA_STATUS_H_
#define LUMEN_WORKER_CUDA_CUDA_STATUS_H_

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lumen::cuda {

// RESOURCE_EXHAUSTED for out-of-memory errors, UNAVAILABLE when no usable device or driver is
// present, INTERNAL otherwise. The message reads "<op>: <call> failed: <name> (<text>)".
inline absl::Status CudaError(cudaError_t err, const char* call, const std::string& op) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat(op, ": ", call, " failed: ", cudaGetErrorName(err), " (",
                                       cudaGetErrorString(err), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

inline absl::Status CublasError(cublasStatus_t st, const char* call, const std::string& op) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg = absl::StrCat(op, ": ", call, " failed: cuBLAS status ",
                                       static_cast<int>(st), " (", cublasGetStatusString(st),
                                       ")");
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
    return absl::InvalidArgumentError(msg);
  }
  return absl::InternalError(msg);
}

}  // namespace lumen::cuda

// Returns from the enclosing function when the CUDA runtime call `expr` fails; `op` (a
// std::string or const char*) names what the call was for.
#define CUDA_RETURN_IF_ERROR(expr, op)                                        \
  do {                                                                        \
    const cudaError_t lumen_cuda_err_ = (expr);                               \
    if (lumen_cuda_err_ != cudaSuccess) {                                     \
      (void)cudaGetLastError(); /* clear it, so later launches start clean */ \
      return ::lumen::cuda::CudaError(lumen_cuda_err_, #expr, (op));          \
    }                                                                         \
  } while (0)

#define CUBLAS_RETURN_IF_ERROR(expr, op)                                      \
  do {                                                                        \
    const cublasStatus_t lumen_cublas_st_ = (expr);                           \
    if (lumen_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                          \
      return ::lumen::cuda::CublasError(lumen_cublas_st_, #expr, (op));       \
    }                                                                         \
  } while (0)

// After a kernel launch: reports launch-configuration errors (not asynchronous faults, which
// surface at the next synchronising call; a sticky fault of an earlier kernel is reported here
// as the failure of this launch).
#define CUDA_RETURN_IF_LAUNCH_ERROR(op) \
  CUDA_RETURN_IF_ERROR(cudaGetLastError(), std::string("launch of ") + (op))

#endif  // LUMEN_WORKER_CUDA_CUDA_STATUS_H_
