#include "worker/cuda/attention.h"

#include <cmath>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/cuda/cuda_status.h"

namespace lumen::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

// A block handles kTile query rows (forward, dq) or key rows (dk/dv); each row is owned by
// kLanes consecutive threads, lane l holding the bf16 pairs l, l + kLanes, l + 2*kLanes, ...
// of the head vector, so a dot product is a per-lane partial sum and two shuffles.
constexpr int kTile = 64;
constexpr int kLanes = 4;
constexpr int kThreads = kTile * kLanes;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float LaneGroupSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// Loads kTile rows (head vector at column `col` of rows row0.. of a [*, ld] matrix whose rows
// r = b*seq + t) into shared memory; rows past seq become zeros.
template <int D>
__device__ __forceinline__ void LoadTile(const bf16* base, int64_t ld, int64_t b, int64_t seq,
                                         int64_t row0, int64_t col, bf162 (*tile)[D / 2]) {
  for (int idx = threadIdx.x; idx < kTile * (D / 2); idx += kThreads) {
    const int r = idx / (D / 2), p = idx % (D / 2);
    const int64_t t = row0 + r;
    bf162 v = __floats2bfloat162_rn(0.0f, 0.0f);
    if (t < seq) v = reinterpret_cast<const bf162*>(base + (b * seq + t) * ld + col)[p];
    tile[r][p] = v;
  }
}

// Reads this lane's pairs of one head vector from global memory into fp32 registers.
template <int D>
__device__ __forceinline__ void LoadRow(const bf16* row, int lane, float scale, float* dst) {
  const bf162* r2 = reinterpret_cast<const bf162*>(row);
#pragma unroll
  for (int x = 0; x < D / 8; ++x) {
    const float2 f = __bfloat1622float2(r2[lane + kLanes * x]);
    dst[2 * x] = f.x * scale;
    dst[2 * x + 1] = f.y * scale;
  }
}

template <int D>
__device__ __forceinline__ void StoreRow(const float* src, float scale, int lane, bf16* row) {
  bf162* r2 = reinterpret_cast<bf162*>(row);
#pragma unroll
  for (int x = 0; x < D / 8; ++x) {
    r2[lane + kLanes * x] = __floats2bfloat162_rn(src[2 * x] * scale, src[2 * x + 1] * scale);
  }
}

template <int D>
__device__ __forceinline__ float PartialDot(const float* a, const bf162* tile_row, int lane) {
  float acc = 0.0f;
#pragma unroll
  for (int x = 0; x < D / 8; ++x) {
    const float2 f = __bfloat1622float2(tile_row[lane + kLanes * x]);
    acc += a[2 * x] * f.x + a[2 * x + 1] * f.y;
  }
  return acc;
}

template <int D>
__device__ __forceinline__ void Axpy(float alpha, const bf162* tile_row, int lane, float* acc) {
#pragma unroll
  for (int x = 0; x < D / 8; ++x) {
    const float2 f = __bfloat1622float2(tile_row[lane + kLanes * x]);
    acc[2 * x] += alpha * f.x;
    acc[2 * x + 1] += alpha * f.y;
  }
}

// grid (query tiles, batch * heads). Online softmax over key tiles up to the diagonal.
template <int D>
__global__ void __launch_bounds__(kThreads)
    FlashForwardKernel(QkvView qkv, int64_t seq, int heads, int kv_heads, float scale,
                       bf16* out, float* lse) {
  __shared__ bf162 sk[kTile][D / 2];
  __shared__ bf162 sv[kTile][D / 2];
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t kvh = h / (heads / kv_heads);
  const int64_t q0 = int64_t{blockIdx.x} * kTile, i = q0 + row;
  const bool valid = i < seq;
  float q[D / 4], o[D / 4];
#pragma unroll
  for (int x = 0; x < D / 4; ++x) q[x] = o[x] = 0.0f;
  // Scores in log2 units: q is pre-multiplied by scale * log2(e).
  if (valid) LoadRow<D>(qkv.q + (b * seq + i) * qkv.ld + h * D, lane, scale * kLog2e, q);
  float m = -INFINITY, l = 0.0f;
  const int64_t last_key = (q0 + kTile < seq ? q0 + kTile : seq) - 1;
  for (int64_t c0 = 0; c0 <= last_key; c0 += kTile) {
    __syncthreads();
    LoadTile<D>(qkv.k, qkv.ld, b, seq, c0, kvh * D, sk);
    LoadTile<D>(qkv.v, qkv.ld, b, seq, c0, kvh * D, sv);
    __syncthreads();
    float s[kTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float acc = LaneGroupSum(PartialDot<D>(q, sk[j], lane));
      const int64_t key = c0 + j;
      s[j] = (key <= i && key < seq) ? acc : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    // Every processed tile holds a key <= min(i, seq - 1), so m_new is finite.
    const float m_new = fmaxf(m, tile_max);
    const float corr = exp2f(m - m_new);
    l *= corr;
#pragma unroll
    for (int x = 0; x < D / 4; ++x) o[x] *= corr;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float p = exp2f(s[j] - m_new);
      l += p;
      Axpy<D>(p, sv[j], lane, o);
    }
    m = m_new;
  }
  if (valid) {
    StoreRow<D>(o, 1.0f / l, lane, out + (b * seq + i) * heads * D + h * D);
    if (lane == 0) lse[bh * seq + i] = (m + log2f(l)) * kLn2;
  }
}

// delta[(b*heads + h)*seq + t] = sum_d dout * out; one warp per (token, head).
__global__ void DeltaKernel(const bf16* out, const bf16* dout, int64_t rows, int64_t seq,
                            int heads, int head_dim, float* delta) {
  const int64_t warp = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * heads) return;
  const int64_t r = warp / heads, h = warp % heads;
  const bf16* o = out + r * heads * head_dim + h * head_dim;
  const bf16* d = dout + r * heads * head_dim + h * head_dim;
  float acc = 0.0f;
  for (int x = lane; x < head_dim; x += 32) acc += __bfloat162float(o[x]) * __bfloat162float(d[x]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    const int64_t b = r / seq, t = r % seq;
    delta[(b * heads + h) * seq + t] = acc;
  }
}

// dq: grid (query tiles, batch * heads), recomputing P from lse.
template <int D>
__global__ void __launch_bounds__(kThreads)
    FlashBackwardDqKernel(QkvView qkv, const bf16* dout, const float* lse, const float* delta,
                          int64_t seq, int heads, int kv_heads, float scale, bf16* dq,
                          int64_t d_ld) {
  __shared__ bf162 sk[kTile][D / 2];
  __shared__ bf162 sv[kTile][D / 2];
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t kvh = h / (heads / kv_heads);
  const int64_t q0 = int64_t{blockIdx.x} * kTile, i = q0 + row;
  const bool valid = i < seq;
  float q[D / 4], dov[D / 4], dqa[D / 4];
#pragma unroll
  for (int x = 0; x < D / 4; ++x) q[x] = dov[x] = dqa[x] = 0.0f;
  float lse2 = 0.0f, dl = 0.0f;
  if (valid) {
    LoadRow<D>(qkv.q + (b * seq + i) * qkv.ld + h * D, lane, scale * kLog2e, q);
    LoadRow<D>(dout + (b * seq + i) * heads * D + h * D, lane, 1.0f, dov);
    lse2 = lse[bh * seq + i] * kLog2e;
    dl = delta[bh * seq + i];
  }
  const int64_t last_key = (q0 + kTile < seq ? q0 + kTile : seq) - 1;
  for (int64_t c0 = 0; c0 <= last_key; c0 += kTile) {
    __syncthreads();
    LoadTile<D>(qkv.k, qkv.ld, b, seq, c0, kvh * D, sk);
    LoadTile<D>(qkv.v, qkv.ld, b, seq, c0, kvh * D, sv);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      const float s2 = LaneGroupSum(PartialDot<D>(q, sk[j], lane));
      const float dp = LaneGroupSum(PartialDot<D>(dov, sv[j], lane));
      const int64_t key = c0 + j;
      const float p = (valid && key <= i && key < seq) ? exp2f(s2 - lse2) : 0.0f;
      Axpy<D>(p * (dp - dl), sk[j], lane, dqa);
    }
  }
  if (valid) StoreRow<D>(dqa, scale, lane, dq + (b * seq + i) * d_ld + h * D);
}

// dk, dv: grid (key tiles, batch * kv_heads); sums over the group's query heads and the query
// rows at or after each key.
template <int D>
__global__ void __launch_bounds__(kThreads)
    FlashBackwardDkvKernel(QkvView qkv, const bf16* dout, const float* lse, const float* delta,
                           int64_t seq, int heads, int kv_heads, float scale, bf16* dk, bf16* dv,
                           int64_t d_ld) {
  __shared__ bf162 sq[kTile][D / 2];
  __shared__ bf162 sdo[kTile][D / 2];
  __shared__ float slse[kTile], sdelta[kTile];
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t bk = blockIdx.y, b = bk / kv_heads, kvh = bk % kv_heads;
  const int group = heads / kv_heads;
  const int64_t k0 = int64_t{blockIdx.x} * kTile, j = k0 + row;
  const bool valid = j < seq;
  float k[D / 4], v[D / 4], dka[D / 4], dva[D / 4];
#pragma unroll
  for (int x = 0; x < D / 4; ++x) k[x] = v[x] = dka[x] = dva[x] = 0.0f;
  if (valid) {
    LoadRow<D>(qkv.k + (b * seq + j) * qkv.ld + kvh * D, lane, scale * kLog2e, k);
    LoadRow<D>(qkv.v + (b * seq + j) * qkv.ld + kvh * D, lane, 1.0f, v);
  }
  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t bh = b * heads + h;
    for (int64_t q0 = k0; q0 < seq; q0 += kTile) {
      __syncthreads();
      LoadTile<D>(qkv.q, qkv.ld, b, seq, q0, h * D, sq);
      LoadTile<D>(dout, int64_t{heads} * D, b, seq, q0, h * D, sdo);
      if (threadIdx.x < kTile) {
        const int64_t t = q0 + threadIdx.x;
        slse[threadIdx.x] = t < seq ? lse[bh * seq + t] * kLog2e : 0.0f;
        sdelta[threadIdx.x] = t < seq ? delta[bh * seq + t] : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < kTile; ++ii) {
        const int64_t i = q0 + ii;
        const float s2 = LaneGroupSum(PartialDot<D>(k, sq[ii], lane));
        const float dp = LaneGroupSum(PartialDot<D>(v, sdo[ii], lane));
        const float p = (valid && i < seq && j <= i) ? exp2f(s2 - slse[ii]) : 0.0f;
        Axpy<D>(p, sdo[ii], lane, dva);
        Axpy<D>(p * (dp - sdelta[ii]), sq[ii], lane, dka);
      }
    }
  }
  if (valid) {
    StoreRow<D>(dka, scale, lane, dk + (b * seq + j) * d_ld + kvh * D);
    StoreRow<D>(dva, 1.0f, lane, dv + (b * seq + j) * d_ld + kvh * D);
  }
}

bool Aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

absl::Status CheckShape(const char* op, const QkvView& qkv, const AttentionShape& s,
                        int64_t d_ld) {
  const int64_t tiles = (s.seq + kTile - 1) / kTile;
  if (s.batch <= 0 || s.seq <= 0 || s.heads <= 0 || s.kv_heads <= 0 ||
      s.heads % s.kv_heads != 0 ||
      !(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128) ||
      qkv.ld < s.heads * s.head_dim || qkv.ld % 2 != 0 || d_ld % 2 != 0 ||
      s.batch * s.heads > 65535 || tiles > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": unsupported shape batch=", s.batch, " seq=", s.seq, " heads=",
                     s.heads, " kv_heads=", s.kv_heads, " head_dim=", s.head_dim,
                     " (32, 64 or 128) ld=", qkv.ld, " d_ld=", d_ld));
  }
  if (!Aligned4(qkv.q) || !Aligned4(qkv.k) || !Aligned4(qkv.v)) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": q, k, v must be 4-byte aligned"));
  }
  return absl::OkStatus();
}

template <int D>
absl::Status LaunchForward(const QkvView& qkv, const AttentionShape& s, bf16* out, float* lse,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((s.seq + kTile - 1) / kTile),
                  static_cast<unsigned>(s.batch * s.heads));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  FlashForwardKernel<D><<<grid, kThreads, 0, stream>>>(qkv, s.seq, static_cast<int>(s.heads),
                                                       static_cast<int>(s.kv_heads), scale, out,
                                                       lse);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("FlashForwardKernel<", D, ">"));
  return absl::OkStatus();
}

template <int D>
absl::Status LaunchBackward(const QkvView& qkv, const AttentionShape& s, const bf16* dout,
                            const float* lse, const float* delta, bf16* dq, bf16* dk, bf16* dv,
                            int64_t d_ld, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((s.seq + kTile - 1) / kTile);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int heads = static_cast<int>(s.heads), kv = static_cast<int>(s.kv_heads);
  FlashBackwardDqKernel<D><<<dim3(tiles, static_cast<unsigned>(s.batch * s.heads)), kThreads, 0,
                             stream>>>(qkv, dout, lse, delta, s.seq, heads, kv, scale, dq, d_ld);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("FlashBackwardDqKernel<", D, ">"));
  FlashBackwardDkvKernel<D><<<dim3(tiles, static_cast<unsigned>(s.batch * s.kv_heads)), kThreads,
                              0, stream>>>(qkv, dout, lse, delta, s.seq, heads, kv, scale, dk, dv,
                                           d_ld);
  CUDA_RETURN_IF_LAUNCH_ERROR(absl::StrCat("FlashBackwardDkvKernel<", D, ">"));
  return absl::OkStatus();
}

// Whether to use the tensor-core kernels; FAILED_PRECONDITION when they were asked for but
// do not fit the device.
absl::StatusOr<bool> UseTensorCores(AttentionKernel kernel, int64_t head_dim, const char* op) {
  if (kernel == AttentionKernel::kCudaCores) return false;
  const bool fits = internal::TensorCoreAttentionFits(head_dim);
  if (kernel == AttentionKernel::kTensorCores && !fits) {
    return absl::FailedPreconditionError(absl::StrCat(
        op, ": tensor-core attention for head_dim ", head_dim,
        " needs more shared memory per block than this device offers"));
  }
  return fits;
}

}  // namespace

absl::Status AttentionForward(const QkvView& qkv, const AttentionShape& shape, bf16* out,
                              float* lse, cudaStream_t stream, AttentionKernel kernel) {
  if (absl::Status st = CheckShape("AttentionForward", qkv, shape, 2); !st.ok()) return st;
  absl::StatusOr<bool> tc = UseTensorCores(kernel, shape.head_dim, "AttentionForward");
  if (!tc.ok()) return tc.status();
  if (*tc) return internal::TensorCoreAttentionForward(qkv, shape, out, lse, stream);
  switch (shape.head_dim) {
    case 32:
      return LaunchForward<32>(qkv, shape, out, lse, stream);
    case 64:
      return LaunchForward<64>(qkv, shape, out, lse, stream);
    default:
      return LaunchForward<128>(qkv, shape, out, lse, stream);
  }
}

absl::Status AttentionBackward(const QkvView& qkv, const AttentionShape& shape, const bf16* out,
                               const bf16* dout, const float* lse, float* delta, bf16* dq,
                               bf16* dk, bf16* dv, int64_t d_ld, cudaStream_t stream,
                               AttentionKernel kernel) {
  if (absl::Status st = CheckShape("AttentionBackward", qkv, shape, d_ld); !st.ok()) return st;
  absl::StatusOr<bool> tc = UseTensorCores(kernel, shape.head_dim, "AttentionBackward");
  if (!tc.ok()) return tc.status();
  if (d_ld < shape.heads * shape.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("AttentionBackward: d_ld ", d_ld, " < ",
                                                   shape.heads * shape.head_dim));
  }
  const int64_t rows = shape.batch * shape.seq;
  const int64_t warps = rows * shape.heads;
  const int64_t blocks = (warps * 32 + 255) / 256;
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("AttentionBackward: too many rows");
  DeltaKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      out, dout, rows, shape.seq, static_cast<int>(shape.heads),
      static_cast<int>(shape.head_dim), delta);
  CUDA_RETURN_IF_LAUNCH_ERROR("DeltaKernel");
  if (*tc) {
    return internal::TensorCoreAttentionBackward(qkv, shape, dout, lse, delta, dq, dk, dv, d_ld,
                                                 stream);
  }
  switch (shape.head_dim) {
    case 32:
      return LaunchBackward<32>(qkv, shape, dout, lse, delta, dq, dk, dv, d_ld, stream);
    case 64:
      return LaunchBackward<64>(qkv, shape, dout, lse, delta, dq, dk, dv, d_ld, stream);
    default:
      return LaunchBackward<128>(qkv, shape, dout, lse, delta, dq, dk, dv, d_ld, stream);
  }
}

}  // namespace lumen::cuda::kernels
