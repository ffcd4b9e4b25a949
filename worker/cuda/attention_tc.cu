// Tensor-core (WMMA bf16 16x16x16, fp32 accumulate) variants of the flash-attention kernels in
// attention.cu. A block handles 64 query (or key) rows with 4 warps of 16 rows each; scores,
// probabilities and the output accumulator live in shared memory between the WMMA products,
// where the online-softmax bookkeeping is done element-wise. Same contracts and layouts as
// attention.h; dispatched from there.
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/cuda_status.h"

namespace lumen::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// kTile rows of head vectors (column `col` of rows b*seq + row0 + r of a [*, ld] matrix) into
// tile[kTile][D]; rows past seq become zeros.
template <int D>
__device__ __forceinline__ void LoadTile(const bf16* base, int64_t ld, int64_t b, int64_t seq,
                                         int64_t row0, int64_t col, bf16* tile) {
  bf162* t2 = reinterpret_cast<bf162*>(tile);
  for (int idx = threadIdx.x; idx < kTile * (D / 2); idx += kThreads) {
    const int r = idx / (D / 2), p = idx % (D / 2);
    const int64_t t = row0 + r;
    bf162 v = __floats2bfloat162_rn(0.0f, 0.0f);
    if (t < seq) v = reinterpret_cast<const bf162*>(base + (b * seq + t) * ld + col)[p];
    t2[idx] = v;
  }
}

// C[16 x 16*NT] (fp32, row-major, ldc) = A[16 x K] (row-major, lda) * B, where B is
// [K x 16*NT] row-major (kTransB false, ldb) or the transpose of a row-major [16*NT x K]
// matrix (kTransB true, ldb). When kAccumulate, C is loaded first.
template <int K, int NT, bool kTransB, bool kAccumulate>
__device__ __forceinline__ void WarpGemm(const bf16* a, int lda, const bf16* b, int ldb,
                                         float* c, int ldc) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    FragC acc;
    if (kAccumulate) {
      wmma::load_matrix_sync(acc, c + nt * 16, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int kt = 0; kt < K / 16; ++kt) {
      FragA fa;
      wmma::load_matrix_sync(fa, a + kt * 16, lda);
      if (kTransB) {
        FragBt fb;  // element (k, n) at b[n * ldb + k]
        wmma::load_matrix_sync(fb, b + static_cast<int64_t>(nt) * 16 * ldb + kt * 16, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        FragB fb;  // element (k, n) at b[k * ldb + n]
        wmma::load_matrix_sync(fb, b + static_cast<int64_t>(kt) * 16 * ldb + nt * 16, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
    wmma::store_matrix_sync(c + nt * 16, acc, ldc, wmma::mem_row_major);
  }
}

template <int D>
constexpr int ForwardSmem() {
  return 3 * kTile * D * 2 + kTile * kTile * 4 + kTile * kTile * 2 + kTile * D * 4 + 3 * kTile * 4;
}
template <int D>
constexpr int DqSmem() {
  return 4 * kTile * D * 2 + 2 * kTile * kTile * 4 + kTile * kTile * 2 + kTile * D * 4 +
         2 * kTile * 4;
}
template <int D>
constexpr int DkvSmem() {
  return 4 * kTile * D * 2 + kTile * kTile * 4 + 2 * kTile * kTile * 2 + 2 * kTile * D * 4 +
         2 * kTile * 4;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    TcForwardKernel(QkvView qkv, int64_t seq, int heads, int kv_heads, float scale, bf16* out,
                    float* lse) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sk = sq + kTile * D;
  bf16* sv = sk + kTile * D;
  float* ss = reinterpret_cast<float*>(sv + kTile * D);
  bf16* sp = reinterpret_cast<bf16*>(ss + kTile * kTile);
  float* so = reinterpret_cast<float*>(sp + kTile * kTile);
  float* sm = so + kTile * D;
  float* sl = sm + kTile;
  float* sc = sl + kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t kvh = h / (heads / kv_heads);
  const int64_t q0 = int64_t{blockIdx.x} * kTile;
  const float scale_log2 = scale * kLog2e;
  LoadTile<D>(qkv.q, qkv.ld, b, seq, q0, h * D, sq);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) so[idx] = 0.0f;
  if (threadIdx.x < kTile) {
    sm[threadIdx.x] = -INFINITY;
    sl[threadIdx.x] = 0.0f;
  }
  const int w0 = warp * 16;  // this warp's first row
  const int64_t last_key = (q0 + kTile < seq ? q0 + kTile : seq) - 1;
  for (int64_t c0 = 0; c0 <= last_key; c0 += kTile) {
    __syncthreads();
    LoadTile<D>(qkv.k, qkv.ld, b, seq, c0, kvh * D, sk);
    LoadTile<D>(qkv.v, qkv.ld, b, seq, c0, kvh * D, sv);
    __syncthreads();
    // S = Q K^T for the warp's 16 rows.
    WarpGemm<D, kTile / 16, true, false>(sq + w0 * D, D, sk, D, ss + w0 * kTile, kTile);
    __syncwarp();
    // Online softmax: two lanes per row, 32 columns each. Each lane starts at its own column
    // ((j + lane) & 31), so the 32 lanes hit 32 different shared-memory banks at every step
    // (in order, all 32 would hit the same bank); max and sum do not depend on the order.
    {
      const int r = w0 + lane / 2, half = lane % 2;
      const int64_t i = q0 + r;
      float* srow = ss + r * kTile;
      float mx = -INFINITY;
      for (int j = 0; j < 32; ++j) {
        const int col = half * 32 + ((j + lane) & 31);
        const int64_t key = c0 + col;
        const float s = (key <= i && key < seq) ? srow[col] * scale_log2 : -INFINITY;
        srow[col] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = sm[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int j = 0; j < 32; ++j) {
        const int col = half * 32 + ((j + lane) & 31);
        const float p = exp2f(srow[col] - m_new);
        sum += p;
        sp[r * kTile + col] = __float2bfloat16(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float corr = exp2f(m_old - m_new);
      __syncwarp();
      if (half == 0) {
        sl[r] = sl[r] * corr + sum;
        sm[r] = m_new;
        sc[r] = corr;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * D; idx += 32) so[w0 * D + idx] *= sc[w0 + idx / D];
    __syncwarp();
    // O += P V.
    WarpGemm<kTile, D / 16, false, true>(sp + w0 * kTile, kTile, sv, D, so + w0 * D, D);
    __syncwarp();
  }
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = w0 + idx / D, d = idx % D;
    const int64_t i = q0 + r;
    if (i < seq) out[(b * seq + i) * heads * D + h * D + d] = __float2bfloat16(so[r * D + d] / sl[r]);
  }
  if (lane < 16) {
    const int r = w0 + lane;
    const int64_t i = q0 + r;
    if (i < seq) lse[bh * seq + i] = (sm[r] + log2f(sl[r])) * kLn2;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    TcBackwardDqKernel(QkvView qkv, const bf16* dout, const float* lse, const float* delta,
                       int64_t seq, int heads, int kv_heads, float scale, bf16* dq, int64_t d_ld) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sdo = sq + kTile * D;
  bf16* sk = sdo + kTile * D;
  bf16* sv = sk + kTile * D;
  float* ss = reinterpret_cast<float*>(sv + kTile * D);
  float* sdp = ss + kTile * kTile;
  bf16* sds = reinterpret_cast<bf16*>(sdp + kTile * kTile);
  float* sdq = reinterpret_cast<float*>(sds + kTile * kTile);
  float* slse = sdq + kTile * D;
  float* sdelta = slse + kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t kvh = h / (heads / kv_heads);
  const int64_t q0 = int64_t{blockIdx.x} * kTile;
  const float scale_log2 = scale * kLog2e;
  LoadTile<D>(qkv.q, qkv.ld, b, seq, q0, h * D, sq);
  LoadTile<D>(dout, int64_t{heads} * D, b, seq, q0, h * D, sdo);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) sdq[idx] = 0.0f;
  if (threadIdx.x < kTile) {
    const int64_t i = q0 + threadIdx.x;
    slse[threadIdx.x] = i < seq ? lse[bh * seq + i] * kLog2e : 0.0f;
    sdelta[threadIdx.x] = i < seq ? delta[bh * seq + i] : 0.0f;
  }
  const int w0 = warp * 16;
  const int64_t last_key = (q0 + kTile < seq ? q0 + kTile : seq) - 1;
  for (int64_t c0 = 0; c0 <= last_key; c0 += kTile) {
    __syncthreads();
    LoadTile<D>(qkv.k, qkv.ld, b, seq, c0, kvh * D, sk);
    LoadTile<D>(qkv.v, qkv.ld, b, seq, c0, kvh * D, sv);
    __syncthreads();
    WarpGemm<D, kTile / 16, true, false>(sq + w0 * D, D, sk, D, ss + w0 * kTile, kTile);
    WarpGemm<D, kTile / 16, true, false>(sdo + w0 * D, D, sv, D, sdp + w0 * kTile, kTile);
    __syncwarp();
    for (int idx = lane; idx < 16 * kTile; idx += 32) {
      const int r = w0 + idx / kTile, col = idx % kTile;
      const int64_t i = q0 + r, key = c0 + col;
      const bool valid = key <= i && key < seq && i < seq;
      const float p = valid ? exp2f(ss[r * kTile + col] * scale_log2 - slse[r]) : 0.0f;
      sds[r * kTile + col] = __float2bfloat16(p * (sdp[r * kTile + col] - sdelta[r]));
    }
    __syncwarp();
    WarpGemm<kTile, D / 16, false, true>(sds + w0 * kTile, kTile, sk, D, sdq + w0 * D, D);
    __syncwarp();
  }
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = w0 + idx / D, d = idx % D;
    const int64_t i = q0 + r;
    if (i < seq) dq[(b * seq + i) * d_ld + h * D + d] = __float2bfloat16(sdq[r * D + d] * scale);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    TcBackwardDkvKernel(QkvView qkv, const bf16* dout, const float* lse, const float* delta,
                        int64_t seq, int heads, int kv_heads, float scale, bf16* dk, bf16* dv,
                        int64_t d_ld) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sk = reinterpret_cast<bf16*>(smem);
  bf16* sv = sk + kTile * D;
  bf16* sq = sv + kTile * D;
  bf16* sdo = sq + kTile * D;
  float* ss = reinterpret_cast<float*>(sdo + kTile * D);  // S^T, then dP^T
  bf16* sp = reinterpret_cast<bf16*>(ss + kTile * kTile);  // P^T
  bf16* sds = sp + kTile * kTile;                           // dS^T
  float* sdk = reinterpret_cast<float*>(sds + kTile * kTile);
  float* sdv = sdk + kTile * D;
  float* slse = sdv + kTile * D;
  float* sdelta = slse + kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bk = blockIdx.y, b = bk / kv_heads, kvh = bk % kv_heads;
  const int group = heads / kv_heads;
  const int64_t k0 = int64_t{blockIdx.x} * kTile;
  const float scale_log2 = scale * kLog2e;
  LoadTile<D>(qkv.k, qkv.ld, b, seq, k0, kvh * D, sk);
  LoadTile<D>(qkv.v, qkv.ld, b, seq, k0, kvh * D, sv);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) sdk[idx] = sdv[idx] = 0.0f;
  const int w0 = warp * 16;  // this warp's first key row
  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t bh = b * heads + h;
    for (int64_t q0 = k0; q0 < seq; q0 += kTile) {
      __syncthreads();
      LoadTile<D>(qkv.q, qkv.ld, b, seq, q0, int64_t{h} * D, sq);
      LoadTile<D>(dout, int64_t{heads} * D, b, seq, q0, int64_t{h} * D, sdo);
      if (threadIdx.x < kTile) {
        const int64_t i = q0 + threadIdx.x;
        slse[threadIdx.x] = i < seq ? lse[bh * seq + i] * kLog2e : 0.0f;
        sdelta[threadIdx.x] = i < seq ? delta[bh * seq + i] : 0.0f;
      }
      __syncthreads();
      // S^T = K Q^T for the warp's 16 keys; P^T from it.
      WarpGemm<D, kTile / 16, true, false>(sk + w0 * D, D, sq, D, ss + w0 * kTile, kTile);
      __syncwarp();
      for (int idx = lane; idx < 16 * kTile; idx += 32) {
        const int r = w0 + idx / kTile, col = idx % kTile;
        const int64_t j = k0 + r, i = q0 + col;
        const bool valid = j <= i && i < seq && j < seq;
        const float p = valid ? exp2f(ss[r * kTile + col] * scale_log2 - slse[col]) : 0.0f;
        sp[r * kTile + col] = __float2bfloat16(p);
      }
      __syncwarp();
      // dP^T = V dO^T over S^T's storage; dS^T = P^T (dP^T - delta).
      WarpGemm<D, kTile / 16, true, false>(sv + w0 * D, D, sdo, D, ss + w0 * kTile, kTile);
      __syncwarp();
      for (int idx = lane; idx < 16 * kTile; idx += 32) {
        const int r = w0 + idx / kTile, col = idx % kTile;
        const float p = __bfloat162float(sp[r * kTile + col]);
        sds[r * kTile + col] = __float2bfloat16(p * (ss[r * kTile + col] - sdelta[col]));
      }
      __syncwarp();
      // dV += P^T dO, dK += dS^T Q.
      WarpGemm<kTile, D / 16, false, true>(sp + w0 * kTile, kTile, sdo, D, sdv + w0 * D, D);
      WarpGemm<kTile, D / 16, false, true>(sds + w0 * kTile, kTile, sq, D, sdk + w0 * D, D);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = w0 + idx / D, d = idx % D;
    const int64_t j = k0 + r;
    if (j < seq) {
      dk[(b * seq + j) * d_ld + kvh * D + d] = __float2bfloat16(sdk[r * D + d] * scale);
      dv[(b * seq + j) * d_ld + kvh * D + d] = __float2bfloat16(sdv[r * D + d]);
    }
  }
}

// Opt-in shared memory available to one block on the current device.
int MaxSmem() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

template <typename Kernel>
absl::Status Prepare(Kernel kernel, int smem, const char* name) {
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      absl::StrCat("opt in ", smem, " bytes of shared memory for ", name));
  return absl::OkStatus();
}

template <int D>
bool FitsD() {
  const int m = MaxSmem();
  return ForwardSmem<D>() <= m && DqSmem<D>() <= m && DkvSmem<D>() <= m;
}

template <int D>
absl::Status Forward(const QkvView& qkv, const AttentionShape& s, bf16* out, float* lse,
                     cudaStream_t stream) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int smem = ForwardSmem<D>();
  if (absl::Status st = Prepare(TcForwardKernel<D>, smem, "TcForwardKernel"); !st.ok()) return st;
  const dim3 grid(static_cast<unsigned>((s.seq + kTile - 1) / kTile),
                  static_cast<unsigned>(s.batch * s.heads));
  TcForwardKernel<D><<<grid, kThreads, smem, stream>>>(qkv, s.seq, static_cast<int>(s.heads),
                                                       static_cast<int>(s.kv_heads), scale, out,
                                                       lse);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("TcForwardKernel<", D, ">"));
  return absl::OkStatus();
}

template <int D>
absl::Status Backward(const QkvView& qkv, const AttentionShape& s, const bf16* dout,
                      const float* lse, const float* delta, bf16* dq, bf16* dk, bf16* dv,
                      int64_t d_ld, cudaStream_t stream) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const unsigned tiles = static_cast<unsigned>((s.seq + kTile - 1) / kTile);
  const int heads = static_cast<int>(s.heads), kv = static_cast<int>(s.kv_heads);
  if (absl::Status st = Prepare(TcBackwardDqKernel<D>, DqSmem<D>(), "TcBackwardDqKernel");
      !st.ok()) {
    return st;
  }
  if (absl::Status st = Prepare(TcBackwardDkvKernel<D>, DkvSmem<D>(), "TcBackwardDkvKernel");
      !st.ok()) {
    return st;
  }
  TcBackwardDqKernel<D><<<dim3(tiles, static_cast<unsigned>(s.batch * s.heads)), kThreads,
                          DqSmem<D>(), stream>>>(qkv, dout, lse, delta, s.seq, heads, kv, scale,
                                                 dq, d_ld);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("TcBackwardDqKernel<", D, ">"));
  TcBackwardDkvKernel<D><<<dim3(tiles, static_cast<unsigned>(s.batch * s.kv_heads)), kThreads,
                           DkvSmem<D>(), stream>>>(qkv, dout, lse, delta, s.seq, heads, kv,
                                                   scale, dk, dv, d_ld);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("TcBackwardDkvKernel<", D, ">"));
  return absl::OkStatus();
}

}  // namespace

namespace internal {

bool TensorCoreAttentionFits(int64_t head_dim) {
  switch (head_dim) {
    case 32:
      return FitsD<32>();
    case 64:
      return FitsD<64>();
    case 128:
      return FitsD<128>();
    default:
      return false;
  }
}

absl::Status TensorCoreAttentionForward(const QkvView& qkv, const AttentionShape& s, bf16* out,
                                        float* lse, cudaStream_t stream) {
  switch (s.head_dim) {
    case 32:
      return Forward<32>(qkv, s, out, lse, stream);
    case 64:
      return Forward<64>(qkv, s, out, lse, stream);
    default:
      return Forward<128>(qkv, s, out, lse, stream);
  }
}

absl::Status TensorCoreAttentionBackward(const QkvView& qkv, const AttentionShape& s,
                                         const bf16* dout, const float* lse, const float* delta,
                                         bf16* dq, bf16* dk, bf16* dv, int64_t d_ld,
                                         cudaStream_t stream) {
  switch (s.head_dim) {
    case 32:
      return Backward<32>(qkv, s, dout, lse, delta, dq, dk, dv, d_ld, stream);
    case 64:
      return Backward<64>(qkv, s, dout, lse, delta, dq, dk, dv, d_ld, stream);
    default:
      return Backward<128>(qkv, s, dout, lse, delta, dq, dk, dv, d_ld, stream);
  }
}

}  // namespace internal
}  // namespace lumen::cuda::kernels
