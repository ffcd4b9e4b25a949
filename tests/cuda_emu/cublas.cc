// cuBLAS and cuBLASLt on the CPU emulator (tests/cuda_emu/README.md): the entry points the
// project calls, with the libraries' column-major contract as NVIDIA documents it
// (D = alpha op(A) op(B) + beta C; a layout gives the matrix as stored, before its op). Only
// bf16 A and B with fp32 compute and scale are supported, C/D bf16 or fp32, which is what the
// project uses; anything else is NOT_SUPPORTED. Descriptors whose shapes do not agree, and
// matrices that are not inside device allocations, are INVALID_VALUE with a line on stderr
// (a GPU would fault later or compute garbage). Products run on the stream's thread, in fp32
// by OpenBLAS (cuBLAS's summation order is its own too); C is not read when beta is 0.
#include <cblas.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tests/cuda_emu/emu.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
};
struct cublasLtContext {};

namespace {

struct MatmulDesc {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
};

struct Layout {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};

struct Preference {};

cublasStatus_t Invalid(const std::string& why) {
  std::fprintf(stderr, "cuda_emu: %s\n", why.c_str());
  return CUBLAS_STATUS_INVALID_VALUE;
}

size_t ElementBytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

float Load(const void* p, cudaDataType_t t, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

void Store(void* p, cudaDataType_t t, int64_t i, float v) {
  if (t == CUDA_R_32F) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  }
}

struct Operand {
  const void* p;
  cudaDataType_t type;
  int64_t ld;
  bool trans;
};

// Column-major D[m x n] = alpha op(A)[m x k] op(B)[k x n] + beta C, queued on `stream`.
cublasStatus_t Queue(cudaStream_t stream, int64_t m, int64_t n, int64_t k, float alpha, Operand a,
                     Operand b, float beta, const void* c, void* d, cudaDataType_t out, int64_t ldc,
                     int64_t ldd, const char* call) {
  const auto span = [](int64_t rows, int64_t cols, int64_t ld, cudaDataType_t t) {
    return static_cast<size_t>((cols - 1) * ld + rows) * ElementBytes(t);
  };
  const int64_t a_rows = a.trans ? k : m, a_cols = a.trans ? m : k;
  const int64_t b_rows = b.trans ? n : k, b_cols = b.trans ? k : n;
  if (!cuda_emu::IsDeviceRange(a.p, span(a_rows, a_cols, a.ld, a.type)) ||
      !cuda_emu::IsDeviceRange(b.p, span(b_rows, b_cols, b.ld, b.type)) ||
      !cuda_emu::IsDeviceRange(d, span(m, n, ldd, out)) ||
      (beta != 0.0f && !cuda_emu::IsDeviceRange(c, span(m, n, ldc, out)))) {
    return Invalid(std::string(call) + ": a matrix is not inside one device allocation (m=" +
                   std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) + ")");
  }
  const cudaError_t err = cuda_emu::EnqueueHostWork(stream, [=] {
    // op(A) and op(B) as row-major floats, multiplied by OpenBLAS in fp32.
    std::vector<float> ar(m * k), br(k * n), dr(m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t p = 0; p < k; ++p) {
        ar[i * k + p] = Load(a.p, a.type, a.trans ? i * a.ld + p : p * a.ld + i);
      }
    }
    for (int64_t p = 0; p < k; ++p) {
      for (int64_t j = 0; j < n; ++j) {
        br[p * n + j] = Load(b.p, b.type, b.trans ? p * b.ld + j : j * b.ld + p);
      }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, ar.data(), static_cast<int>(k), br.data(),
                static_cast<int>(n), 0.0f, dr.data(), static_cast<int>(n));
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        float v = dr[i * n + j];
        if (beta != 0.0f) v += beta * Load(c, out, j * ldc + i);
        Store(d, out, j * ldd + i, v);
      }
    }
  });
  return err == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // namespace

extern "C" {

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "the operation completed successfully";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "the GPU program failed to execute";
    default:
      return "unknown cuBLAS status (CUDA emulator)";
  }
}

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t /*handle*/, void* workspace, size_t bytes) {
  if (bytes > 0 && !cuda_emu::IsDeviceRange(workspace, bytes)) {
    return Invalid("cublasSetWorkspace: the workspace is not device memory");
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t /*handle*/, cublasMath_t /*mode*/) {
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t /*algo*/) {
  if (Atype != CUDA_R_16BF || Btype != CUDA_R_16BF ||
      (Ctype != CUDA_R_16BF && Ctype != CUDA_R_32F) || computeType != CUBLAS_COMPUTE_32F) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  if (m < 0 || n < 0 || k < 0 || lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m || lda < 1 ||
      ldb < 1 || ldc < 1) {
    return Invalid("cublasGemmEx: m=" + std::to_string(m) + " n=" + std::to_string(n) +
                   " k=" + std::to_string(k) + " lda=" + std::to_string(lda) +
                   " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc));
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  return Queue(handle->stream, m, n, k, al, Operand{A, Atype, lda, ta}, Operand{B, Btype, ldb, tb},
               be, C, C, Ctype, ldc, ldc, "cublasGemmEx");
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = new cublasLtContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType) {
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(new MatmulDesc{computeType, scaleType});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete reinterpret_cast<MatmulDesc*>(desc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t bytes) {
  MatmulDesc* d = reinterpret_cast<MatmulDesc*>(desc);
  if (attr == CUBLASLT_MATMUL_DESC_TRANSA || attr == CUBLASLT_MATMUL_DESC_TRANSB) {
    if (buf == nullptr || bytes != sizeof(cublasOperation_t)) {
      return Invalid("cublasLtMatmulDescSetAttribute: size of TRANSA/TRANSB");
    }
    cublasOperation_t op;
    std::memcpy(&op, buf, sizeof(op));
    if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) return CUBLAS_STATUS_NOT_SUPPORTED;
    (attr == CUBLASLT_MATMUL_DESC_TRANSA ? d->trans_a : d->trans_b) = op;
    return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  if (ld < static_cast<int64_t>(rows) || rows == 0 || cols == 0) {
    return Invalid("cublasLtMatrixLayoutCreate: rows=" + std::to_string(rows) +
                   " cols=" + std::to_string(cols) + " ld=" + std::to_string(ld));
  }
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(new Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete reinterpret_cast<Layout*>(layout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new Preference());
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete reinterpret_cast<Preference*>(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t /*pref*/,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t bytes) {
  if (buf == nullptr) return Invalid("cublasLtMatmulPreferenceSetAttribute: null buffer");
  const size_t want =
      attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES ? sizeof(uint64_t) : sizeof(uint32_t);
  if (bytes != want) {
    return Invalid("cublasLtMatmulPreferenceSetAttribute: attribute " + std::to_string(attr) +
                   " takes " + std::to_string(want) + " bytes, given " + std::to_string(bytes));
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

namespace {

// The checks cublasLtMatmul and its heuristic share; m, n, k from the layouts.
cublasStatus_t CheckMatmul(const MatmulDesc& d, const Layout& a, const Layout& b, const Layout& c,
                           const Layout& dl, int64_t* m, int64_t* n, int64_t* k, const char* call) {
  if (d.compute != CUBLAS_COMPUTE_32F || d.scale != CUDA_R_32F || a.type != CUDA_R_16BF ||
      b.type != CUDA_R_16BF || (dl.type != CUDA_R_16BF && dl.type != CUDA_R_32F) ||
      c.type != dl.type) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool ta = d.trans_a == CUBLAS_OP_T, tb = d.trans_b == CUBLAS_OP_T;
  *m = static_cast<int64_t>(dl.rows);
  *n = static_cast<int64_t>(dl.cols);
  *k = static_cast<int64_t>(ta ? a.rows : a.cols);
  const int64_t am = static_cast<int64_t>(ta ? a.cols : a.rows);
  const int64_t bk = static_cast<int64_t>(tb ? b.cols : b.rows);
  const int64_t bn = static_cast<int64_t>(tb ? b.rows : b.cols);
  if (am != *m || bn != *n || bk != *k || c.rows != dl.rows || c.cols != dl.cols) {
    return Invalid(std::string(call) + ": layouts disagree: op(A) is " + std::to_string(am) + "x" +
                   std::to_string(*k) + ", op(B) " + std::to_string(bk) + "x" + std::to_string(bn) +
                   ", C " + std::to_string(c.rows) + "x" + std::to_string(c.cols) + ", D " +
                   std::to_string(dl.rows) + "x" + std::to_string(dl.cols));
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t /*handle*/,
                                              cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t /*pref*/, int requested,
                                              cublasLtMatmulHeuristicResult_t results[],
                                              int* returned) {
  int64_t m = 0, n = 0, k = 0;
  const cublasStatus_t st =
      CheckMatmul(*reinterpret_cast<MatmulDesc*>(desc), *reinterpret_cast<Layout*>(a),
                  *reinterpret_cast<Layout*>(b), *reinterpret_cast<Layout*>(c),
                  *reinterpret_cast<Layout*>(d), &m, &n, &k, "cublasLtMatmulAlgoGetHeuristic");
  *returned = 0;
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (requested < 1) return Invalid("cublasLtMatmulAlgoGetHeuristic: requested < 1");
  std::memset(&results[0], 0, sizeof(results[0]));
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.0f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t /*handle*/, cublasLtMatmulDesc_t desc,
                              const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                              const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                              const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* /*algo*/,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const MatmulDesc& md = *reinterpret_cast<MatmulDesc*>(desc);
  const Layout& a = *reinterpret_cast<Layout*>(Adesc);
  const Layout& b = *reinterpret_cast<Layout*>(Bdesc);
  const Layout& c = *reinterpret_cast<Layout*>(Cdesc);
  const Layout& d = *reinterpret_cast<Layout*>(Ddesc);
  int64_t m = 0, n = 0, k = 0;
  if (cublasStatus_t st = CheckMatmul(md, a, b, c, d, &m, &n, &k, "cublasLtMatmul");
      st != CUBLAS_STATUS_SUCCESS) {
    return st;
  }
  if (c.ld != d.ld && C == D) return Invalid("cublasLtMatmul: C == D with different layouts");
  if (workspace_bytes > 0 && !cuda_emu::IsDeviceRange(workspace, workspace_bytes)) {
    return Invalid("cublasLtMatmul: the workspace is not device memory");
  }
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  return Queue(stream, m, n, k, al, Operand{A, a.type, a.ld, md.trans_a == CUBLAS_OP_T},
               Operand{B, b.type, b.ld, md.trans_b == CUBLAS_OP_T}, be, C, D, d.type, c.ld, d.ld,
               "cublasLtMatmul");
}

}  // extern "C"
