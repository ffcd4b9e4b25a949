#include "worker/cuda/gemm.h"

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/cuda/cuda_status.h"

namespace lumen::cuda {

// Descriptors and the chosen algorithm of one shape; `usable` false when cuBLASLt returned
// no algorithm (the shape then goes to GemmEx).
struct Gemm::LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  bool usable = false;
  ~LtPlan() {
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
    for (cublasLtMatrixLayout_t l : {a, b, c}) {
      if (l != nullptr) cublasLtMatrixLayoutDestroy(l);
    }
  }
};

namespace {

// The largest power of two <= 256 dividing every address.
int CommonAlignment(const void* a, const void* b, const void* c, const void* d) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                   reinterpret_cast<uintptr_t>(d);
  if (c != nullptr) bits |= reinterpret_cast<uintptr_t>(c);
  int align = 256;
  while (align > 1 && bits % align != 0) align /= 2;
  return align;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(void* workspace, int64_t workspace_bytes) {
  std::unique_ptr<Gemm> g(new Gemm());
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&g->lt_), "create GEMM engine");
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&g->blas_), "create GEMM engine");
  CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(g->blas_, workspace, workspace_bytes),
                         "create GEMM engine");
  CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(g->blas_, CUBLAS_DEFAULT_MATH), "create GEMM engine");
  g->workspace_ = workspace;
  g->workspace_bytes_ = workspace_bytes;
  return g;
}

Gemm::~Gemm() {
  plans_.clear();
  if (blas_ != nullptr) cublasDestroy(blas_);
  if (lt_ != nullptr) cublasLtDestroy(lt_);
}

// Row-major D = op(A) op(B) is column-major D^T = op(B)^T op(A)^T: cuBLAS sees B as its first
// operand (m_cm = n) and A as its second (n_cm = m), each with the op given for it.
absl::Status Gemm::Run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                       const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b, int64_t ldb,
                       float beta, const void* c, void* d, int64_t ldd, GemmOut out,
                       cudaStream_t stream, const std::string& op) {
  if (m <= 0 || n <= 0 || k <= 0 || lda < (trans_a ? m : k) || ldb < (trans_b ? k : n) ||
      ldd < n || (beta != 0.0f && c == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": bad GEMM m=", m, " n=", n, " k=", k, " lda=", lda, " ldb=", ldb, " ldd=", ldd,
        " trans_a=", trans_a, " trans_b=", trans_b));
  }
  if (backend_ == GemmBackend::kCublasGemmEx) {
    return RunGemmEx(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, d, ldd, out, stream, op);
  }
  const int align = CommonAlignment(a, b, beta != 0.0f ? c : nullptr, d);
  const Key key{trans_a, trans_b, m, n, k, lda, ldb, ldd, static_cast<int>(out), beta != 0.0f,
                align};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    auto plan = std::make_unique<LtPlan>();
    const std::string pop = absl::StrCat(op, " (plan ", m, "x", n, "x", k, ")");
    const cudaDataType_t out_type = out == GemmOut::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                           pop);
    const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                       sizeof(op_first)),
        pop);
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                       sizeof(op_second)),
        pop);
    // Stored (pre-op) column-major shapes: first operand B, second A.
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, trans_b ? k : n,
                                                      trans_b ? n : k, ldb),
                           pop);
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, trans_a ? m : k,
                                                      trans_a ? k : m, lda),
                           pop);
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->c, out_type, n, m, ldd), pop);
    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref), pop);
    const uint64_t ws = static_cast<uint64_t>(workspace_bytes_);
    const uint32_t al = static_cast<uint32_t>(align);
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      if (st == CUBLAS_STATUS_SUCCESS) {
        st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al));
      }
    }
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS) {
      st = cublasLtMatmulAlgoGetHeuristic(lt_, plan->desc, plan->a, plan->b, plan->c, plan->c,
                                          pref, 1, &result, &found);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    // NOT_SUPPORTED / no result: the shape goes to GemmEx. Other errors are real.
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
      return CublasError(st, "cublasLtMatmulAlgoGetHeuristic", pop);
    }
    plan->usable = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (plan->usable) plan->algo = result.algo;
    it = plans_.emplace(key, std::move(plan)).first;
  }
  const LtPlan& plan = *it->second;
  if (!plan.usable) {
    ++fallbacks_;
    return RunGemmEx(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, d, ldd, out, stream, op);
  }
  const float alpha = 1.0f;
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmul(lt_, plan.desc, &alpha, b, plan.a, a, plan.b, &beta,
                     beta != 0.0f ? c : d, plan.c, d, plan.c, &plan.algo, workspace_,
                     static_cast<size_t>(workspace_bytes_), stream),
      op);
  return absl::OkStatus();
}

absl::Status Gemm::RunGemmEx(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                             const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b,
                             int64_t ldb, float beta, const void* c, void* d, int64_t ldd,
                             GemmOut out, cudaStream_t stream, const std::string& op) {
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX ||
      ldd > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": GEMM dimension above 2^31"));
  }
  const size_t elem = out == GemmOut::kBf16 ? 2 : 4;
  // GemmEx has no separate C: copy C into D first when they differ.
  if (beta != 0.0f && c != d) {
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(d, ldd * elem, c, ldd * elem, n * elem, m,
                                           cudaMemcpyDeviceToDevice, stream),
                         op);
  }
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(blas_, stream), op);
  // cublasSetStream resets the handle to cuBLAS's own workspace pool (outside the budget):
  // give it ours again. One stream runs the GEMMs, so cuBLASLt and cuBLAS can share it.
  CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(blas_, workspace_, workspace_bytes_), op);
  const float alpha = 1.0f;
  const cudaDataType_t out_type = out == GemmOut::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
  CUBLAS_RETURN_IF_ERROR(
      cublasGemmEx(blas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                   CUDA_R_16BF, static_cast<int>(ldb), a, CUDA_R_16BF, static_cast<int>(lda),
                   &beta, d, out_type, static_cast<int>(ldd), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      op);
  return absl::OkStatus();
}

}  // namespace lumen::cuda
