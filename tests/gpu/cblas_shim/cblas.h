// A stand-in for OpenBLAS's <cblas.h> with only what worker/engine uses (row/column-major
// sgemm and dgemm, openblas_set_num_threads), so the CPU reference in the GPU check binaries
// needs no OpenBLAS (36 MB) on the GPU machine. Used only by tests/gpu/check.sh --build, which
// puts this directory first on the include path. Thread-safe (no state).
#ifndef LUMEN_TESTS_GPU_CBLAS_SHIM_CBLAS_H_
#define LUMEN_TESTS_GPU_CBLAS_SHIM_CBLAS_H_

#ifdef __cplusplus
extern "C" {
#endif

enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };

void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a,
                 enum CBLAS_TRANSPOSE trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc);
void cblas_dgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a,
                 enum CBLAS_TRANSPOSE trans_b, int m, int n, int k, double alpha,
                 const double* a, int lda, const double* b, int ldb, double beta, double* c,
                 int ldc);
void openblas_set_num_threads(int num_threads);

#ifdef __cplusplus
}
#endif

#endif  // LUMEN_TESTS_GPU_CBLAS_SHIM_CBLAS_H_
