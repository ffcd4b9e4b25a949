// Blocked single-threaded GEMM behind the cblas.h stand-in (see there). C = alpha op(A) op(B)
// + beta C; operands are packed into row-major panels so the inner loop is a unit-stride
// multiply-add the compiler vectorises. Accurate to fp32 rounding, a few GFLOP/s: enough for
// the small CPU reference models of the GPU tests. The engine parallelises over its own
// ThreadPool, so one thread per call is the contract it expects.
#include "cblas.h"

#include <algorithm>
#include <vector>

namespace {

template <typename T>
void Gemm(bool col_major, bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda,
          const T* b, int ldb, T beta, T* c, int ldc) {
  // Column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T.
  if (col_major) {
    std::swap(m, n);
    std::swap(a, b);
    std::swap(lda, ldb);
    std::swap(ta, tb);
  }
  auto A = [&](int i, int p) { return ta ? a[static_cast<long>(p) * lda + i]
                                         : a[static_cast<long>(i) * lda + p]; };
  auto B = [&](int p, int j) { return tb ? b[static_cast<long>(j) * ldb + p]
                                         : b[static_cast<long>(p) * ldb + j]; };
  for (int i = 0; i < m; ++i) {
    T* ci = c + static_cast<long>(i) * ldc;
    for (int j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : ci[j] * beta;
  }
  constexpr int kBlockK = 128, kBlockN = 512;
  std::vector<T> bpanel(static_cast<size_t>(kBlockK) * kBlockN);
  for (int p0 = 0; p0 < k; p0 += kBlockK) {
    const int pk = std::min(kBlockK, k - p0);
    for (int j0 = 0; j0 < n; j0 += kBlockN) {
      const int nj = std::min(kBlockN, n - j0);
      for (int p = 0; p < pk; ++p) {
        for (int j = 0; j < nj; ++j) bpanel[static_cast<size_t>(p) * nj + j] = B(p0 + p, j0 + j);
      }
      for (int i = 0; i < m; ++i) {
        T* ci = c + static_cast<long>(i) * ldc + j0;
        for (int p = 0; p < pk; ++p) {
          const T av = alpha * A(i, p0 + p);
          if (av == T(0)) continue;
          const T* bp = bpanel.data() + static_cast<size_t>(p) * nj;
          for (int j = 0; j < nj; ++j) ci[j] += av * bp[j];
        }
      }
    }
  }
}

}  // namespace

extern "C" {

void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a,
                 enum CBLAS_TRANSPOSE trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  Gemm<float>(order == CblasColMajor, trans_a != CblasNoTrans, trans_b != CblasNoTrans, m, n, k,
              alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a,
                 enum CBLAS_TRANSPOSE trans_b, int m, int n, int k, double alpha,
                 const double* a, int lda, const double* b, int ldb, double beta, double* c,
                 int ldc) {
  Gemm<double>(order == CblasColMajor, trans_a != CblasNoTrans, trans_b != CblasNoTrans, m, n,
               k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void openblas_set_num_threads(int) {}

}  // extern "C"
