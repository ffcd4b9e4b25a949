// bf16 matrix products with fp32 accumulation on one device: cuBLASLt (descriptors and the
// heuristic's algorithm cached per shape), or cublasGemmEx, which the tests use as a second
// opinion and which runs when cuBLASLt offers no algorithm for a shape (e.g. odd leading
// dimensions). Thread-compatible: one thread issues a Gemm's calls at a time.
#ifndef LUMEN_WORKER_CUDA_GEMM_H_
#define LUMEN_WORKER_CUDA_GEMM_H_

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lumen::cuda {

enum class GemmBackend { kCublasLt, kCublasGemmEx };
// Element type of C and D (A and B are always bf16).
enum class GemmOut { kBf16, kF32 };

class Gemm {
 public:
  // `workspace` (device memory of workspace_bytes) is owned by the caller and must outlive
  // the Gemm.
  static absl::StatusOr<std::unique_ptr<Gemm>> Create(void* workspace, int64_t workspace_bytes);
  ~Gemm();

  // Row-major D[m,n] = op(A) op(B) + beta * C, op(X) = X^T when trans_x; A is [m,k] (or
  // [k,m] when trans_a) with leading dimension lda, B is [k,n] (or [n,k]) with ldb; C and D
  // share type `out` and leading dimension ldd (C may equal D, and is ignored when beta == 0).
  // Accumulation in fp32. INVALID_ARGUMENT for bad shapes; cuBLAS errors name `op`.
  absl::Status Run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                   const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b, int64_t ldb,
                   float beta, const void* c, void* d, int64_t ldd, GemmOut out,
                   cudaStream_t stream, const std::string& op);

  // kCublasLt (default) falls back to GemmEx per shape; kCublasGemmEx always uses GemmEx.
  void set_backend(GemmBackend backend) { backend_ = backend; }
  GemmBackend backend() const { return backend_; }
  // Products that cuBLASLt could not serve and went to GemmEx.
  int64_t fallbacks() const { return fallbacks_; }

 private:
  struct LtPlan;
  Gemm() = default;
  absl::Status RunGemmEx(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                         const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b,
                         int64_t ldb, float beta, const void* c, void* d, int64_t ldd,
                         GemmOut out, cudaStream_t stream, const std::string& op);

  cublasLtHandle_t lt_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  GemmBackend backend_ = GemmBackend::kCublasLt;
  int64_t fallbacks_ = 0;
  // Key: trans_a, trans_b, m, n, k, lda, ldb, ldd, out, beta != 0, alignment.
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                         bool, int>;
  std::map<Key, std::unique_ptr<LtPlan>> plans_;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_GEMM_H_
