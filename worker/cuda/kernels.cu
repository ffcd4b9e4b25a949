#include "worker/cuda/kernels.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/cuda/cuda_status.h"

namespace lumen::cuda::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;

int64_t Blocks(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return b < 1 ? 1 : (b > kMaxGrid ? kMaxGrid : b);
}

absl::Status CheckPositive(const char* op, int64_t n, int64_t c) {
  if (n < 0 || c <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": bad shape n=", n, " c=", c));
  }
  return absl::OkStatus();
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
  return WarpSum(v);
}

// ---- Embedding ----
__global__ void EmbeddingForwardKernel(const bf16* table, const int32_t* ids, int64_t n,
                                       int64_t c, bf16* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * c;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / c, j = i % c;
    out[i] = table[static_cast<int64_t>(ids[r]) * c + j];
  }
}

__global__ void EmbeddingBackwardKernel(const bf16* dout, const int32_t* ids, int64_t n,
                                        int64_t c, float* dtable) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * c;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / c, j = i % c;
    atomicAdd(dtable + static_cast<int64_t>(ids[r]) * c + j, __bfloat162float(dout[i]));
  }
}

// ---- RMSNorm: one block per row ----
__global__ void RmsNormForwardKernel(const bf16* x, const bf16* w, int64_t c, float eps, bf16* y,
                                     float* rstd) {
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * c;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    const float v = __bfloat162float(xr[j]);
    ss += v * v;
  }
  ss = BlockSum(ss);
  const float rs = rsqrtf(ss / static_cast<float>(c) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  bf16* yr = y + r * c;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    yr[j] = __float2bfloat16(__bfloat162float(w[j]) * (__bfloat162float(xr[j]) * rs));
  }
}

__global__ void RmsNormBackwardDxKernel(const bf16* dy, const bf16* x, const bf16* w,
                                        const float* rstd, int64_t c, const bf16* residual,
                                        bf16* dx) {
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * c;
  const bf16* dyr = dy + r * c;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    dot += __bfloat162float(dyr[j]) * __bfloat162float(w[j]) * __bfloat162float(xr[j]);
  }
  dot = BlockSum(dot);
  const float rs = rstd[r];
  const float coef = dot * rs * rs * rs / static_cast<float>(c);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    float v = rs * (__bfloat162float(w[j]) * __bfloat162float(dyr[j])) -
              __bfloat162float(xr[j]) * coef;
    if (residual != nullptr) v += __bfloat162float(residual[r * c + j]);
    dx[r * c + j] = __float2bfloat16(v);
  }
}

// dw[j] += sum over a chunk of rows of dy * x * rstd; grid (column blocks, row chunks).
__global__ void RmsNormBackwardDwKernel(const bf16* dy, const bf16* x, const float* rstd,
                                        int64_t n, int64_t c, int64_t rows_per_chunk,
                                        float* dw) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= c) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < n ? r0 + rows_per_chunk : n;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    acc += __bfloat162float(dy[r * c + j]) * (__bfloat162float(x[r * c + j]) * rstd[r]);
  }
  atomicAdd(dw + j, acc);
}

// ---- RoPE: one thread per (row, head, i < half) ----
__global__ void RopeKernel(bf16* x, int64_t rows, int64_t row_stride, int64_t seq, int64_t heads,
                           int64_t head_dim, const float* cos_table, const float* sin_table,
                           bool inverse) {
  const int64_t half = head_dim / 2;
  const int64_t total = rows * heads * half;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < total;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = t % half;
    const int64_t h = (t / half) % heads;
    const int64_t r = t / (half * heads);
    const int64_t pos = r % seq;
    const float cs = cos_table[pos * half + i], sn = sin_table[pos * half + i];
    bf16* v = x + r * row_stride + h * head_dim;
    const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
    if (!inverse) {
      v[i] = __float2bfloat16(a * cs - b * sn);
      v[i + half] = __float2bfloat16(b * cs + a * sn);
    } else {
      v[i] = __float2bfloat16(a * cs + b * sn);
      v[i + half] = __float2bfloat16(b * cs - a * sn);
    }
  }
}

// ---- SwiGLU ----
__global__ void SwiGluForwardKernel(const bf16* gu, int64_t n, int64_t inter, bf16* m) {
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < n * inter;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = t / inter, j = t % inter;
    const float g = __bfloat162float(gu[r * 2 * inter + j]);
    const float u = __bfloat162float(gu[r * 2 * inter + inter + j]);
    m[t] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
  }
}

__global__ void SwiGluBackwardKernel(const bf16* dm, const bf16* gu, int64_t n, int64_t inter,
                                     bf16* dgu) {
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < n * inter;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = t / inter, j = t % inter;
    const float g = __bfloat162float(gu[r * 2 * inter + j]);
    const float u = __bfloat162float(gu[r * 2 * inter + inter + j]);
    const float d = __bfloat162float(dm[t]);
    const float s = 1.0f / (1.0f + __expf(-g));
    dgu[r * 2 * inter + inter + j] = __float2bfloat16(d * (g * s));
    dgu[r * 2 * inter + j] = __float2bfloat16(d * u * (s * (1.0f + g * (1.0f - s))));
  }
}

// ---- Cross-entropy: one block per row, online max / sum of exp ----
constexpr int kCeThreads = 1024;

__global__ void CrossEntropyKernel(bf16* logits, int64_t ld, const int32_t* targets,
                                   int64_t vocab, float grad_scale, float* losses,
                                   float* lse_out) {
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  float mx = -INFINITY, sum = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = __bfloat162float(row[j]);
    if (v > mx) {
      sum = sum * expf(mx - v) + 1.0f;
      mx = v;
    } else {
      sum += expf(v - mx);
    }
  }
  // Combine (max, sum) pairs over the warp, then over the block.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, mx, o);
    const float os = __shfl_xor_sync(0xffffffffu, sum, o);
    const float m2 = fmaxf(mx, om);
    sum = (mx == -INFINITY ? 0.0f : sum * expf(mx - m2)) +
          (om == -INFINITY ? 0.0f : os * expf(om - m2));
    mx = m2;
  }
  __shared__ float smax[32], ssum[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    smax[warp] = mx;
    ssum[warp] = sum;
  }
  __syncthreads();
  const float gmax = WarpMax(lane < warps ? smax[lane] : -INFINITY);
  const float part = lane < warps ? ssum[lane] * expf(smax[lane] - gmax) : 0.0f;
  const float gsum = WarpSum(part);
  const float lse = gmax + logf(gsum);
  const int64_t t = targets[r];
  const float target_logit = __bfloat162float(row[t]);
  __syncthreads();  // every thread has read row[t] before it is overwritten
  if (threadIdx.x == 0) {
    losses[r] = lse - target_logit;
    if (lse_out != nullptr) lse_out[r] = lse;
  }
  if (grad_scale == 0.0f) return;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float g = expf(__bfloat162float(row[j]) - lse) * grad_scale;
    if (j == t) g -= grad_scale;
    row[j] = __float2bfloat16(g);
  }
}

// ---- Reductions to double ----
// CrossEntropyKernel's gradient for columns [v0, v0 + vb) of the full vocabulary, from each
// row's log-sum-exp: one thread per element, grid-stride.
__global__ void CrossEntropyGradColumnsKernel(bf16* logits, int64_t ld, const float* lse,
                                              const int32_t* targets, int64_t n, int64_t v0,
                                              int64_t vb, float grad_scale) {
  const int64_t total = n * vb;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / vb, j = i - r * vb;
    bf16* p = logits + r * ld + j;
    float g = expf(__bfloat162float(*p) - lse[r]) * grad_scale;
    if (v0 + j == targets[r]) g -= grad_scale;
    *p = __float2bfloat16(g);
  }
}

template <bool kSquare>
__global__ void SumKernel(const float* x, int64_t n, double* acc) {
  float s = 0.0f;
  double total = 0.0;
  int64_t count = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = x[i];
    s += kSquare ? v * v : v;
    if (++count == 64) {  // keep float partial sums short
      total += s;
      s = 0.0f;
      count = 0;
    }
  }
  total += s;
  // Block reduction in double.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  __shared__ double partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = total;
  __syncthreads();
  if (warp == 0) {
    total = lane < (blockDim.x >> 5) ? partial[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) atomicAdd(acc, total);
  }
}

// ---- AdamW ----
__global__ void AdamWKernel(float* master, const float* grad, float* exp_avg, float* exp_avg_sq,
                            bf16* param, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    // Explicit round-to-nearest intrinsics: no fused multiply-adds, as on the CPU.
    float p = master[i];
    if (s.apply_decay) p = __fmul_rn(p, s.decay);
    const float g = s.grad_scale == 1.0f ? grad[i] : __fmul_rn(grad[i], s.grad_scale);
    float m = __fmul_rn(exp_avg[i], s.beta1);
    m = __fadd_rn(m, __fmul_rn(s.one_minus_beta1, g));
    float v = __fmul_rn(exp_avg_sq[i], s.beta2);
    v = __fadd_rn(v, __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    master[i] = p;
    if (param != nullptr) param[i] = __float2bfloat16(p);
  }
}

__device__ __forceinline__ uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillNormalKernel(float* x, int64_t n, uint64_t seed, float stddev) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t r = Mix(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    const float u1 = (static_cast<float>(r >> 40) + 1.0f) * (1.0f / 16777217.0f);
    const float u2 = static_cast<float>((r >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    x[i] = stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

__global__ void FillKernel(float* x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = value;
  }
}

__global__ void F32ToBf16Kernel(const float* x, int64_t n, bf16* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2bfloat16(x[i]);
  }
}

__global__ void Bf16ToF32Kernel(const bf16* x, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __bfloat162float(x[i]);
  }
}

}  // namespace

absl::Status EmbeddingForward(const bf16* table, const int32_t* ids, int64_t n, int64_t c,
                              bf16* out, cudaStream_t stream) {
  if (absl::Status s = CheckPositive("EmbeddingForward", n, c); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  EmbeddingForwardKernel<<<Blocks(n * c, kThreads), kThreads, 0, stream>>>(table, ids, n, c, out);
  CUDA_RETURN_IF_LAUNCH_ERROR("EmbeddingForwardKernel");
  return absl::OkStatus();
}

absl::Status EmbeddingBackward(const bf16* dout, const int32_t* ids, int64_t n, int64_t c,
                               float* dtable, cudaStream_t stream) {
  if (absl::Status s = CheckPositive("EmbeddingBackward", n, c); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  EmbeddingBackwardKernel<<<Blocks(n * c, kThreads), kThreads, 0, stream>>>(dout, ids, n, c,
                                                                            dtable);
  CUDA_RETURN_IF_LAUNCH_ERROR("EmbeddingBackwardKernel");
  return absl::OkStatus();
}

absl::Status RmsNormForward(const bf16* x, const bf16* w, int64_t n, int64_t c, float eps,
                            bf16* y, float* rstd, cudaStream_t stream) {
  if (absl::Status s = CheckPositive("RmsNormForward", n, c); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (n > INT32_MAX) return absl::InvalidArgumentError(absl::StrCat("RmsNormForward: n=", n));
  RmsNormForwardKernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(x, w, c, eps, y, rstd);
  CUDA_RETURN_IF_LAUNCH_ERROR("RmsNormForwardKernel");
  return absl::OkStatus();
}

absl::Status RmsNormBackward(const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                             int64_t n, int64_t c, const bf16* residual, bf16* dx, float* dw,
                             cudaStream_t stream) {
  if (absl::Status s = CheckPositive("RmsNormBackward", n, c); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (n > INT32_MAX) return absl::InvalidArgumentError(absl::StrCat("RmsNormBackward: n=", n));
  // dw first, so its reads of dy and x come before dx is written (dx may alias either).
  // Chunks of 64 rows, more when that would exceed the grid's 65535 in y.
  const int64_t rows_per_chunk = std::max<int64_t>(64, (n + 65534) / 65535);
  const dim3 grid(static_cast<unsigned>((c + kThreads - 1) / kThreads),
                  static_cast<unsigned>((n + rows_per_chunk - 1) / rows_per_chunk));
  RmsNormBackwardDwKernel<<<grid, kThreads, 0, stream>>>(dy, x, rstd, n, c, rows_per_chunk, dw);
  CUDA_RETURN_IF_LAUNCH_ERROR("RmsNormBackwardDwKernel");
  RmsNormBackwardDxKernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(dy, x, w, rstd, c,
                                                                             residual, dx);
  CUDA_RETURN_IF_LAUNCH_ERROR("RmsNormBackwardDxKernel");
  return absl::OkStatus();
}

absl::Status Rope(bf16* x, int64_t rows, int64_t row_stride, int64_t seq, int64_t heads,
                  int64_t head_dim, const float* cos_table, const float* sin_table,
                  RopeDirection direction, cudaStream_t stream) {
  if (rows < 0 || seq <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      row_stride < heads * head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("Rope: bad shape rows=", rows, " seq=", seq,
                                                   " heads=", heads, " head_dim=", head_dim,
                                                   " row_stride=", row_stride));
  }
  if (rows == 0) return absl::OkStatus();
  RopeKernel<<<Blocks(rows * heads * head_dim / 2, kThreads), kThreads, 0, stream>>>(
      x, rows, row_stride, seq, heads, head_dim, cos_table, sin_table,
      direction == RopeDirection::kInverse);
  CUDA_RETURN_IF_LAUNCH_ERROR("RopeKernel");
  return absl::OkStatus();
}

absl::Status SwiGluForward(const bf16* gu, int64_t n, int64_t inter, bf16* m,
                           cudaStream_t stream) {
  if (absl::Status s = CheckPositive("SwiGluForward", n, inter); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  SwiGluForwardKernel<<<Blocks(n * inter, kThreads), kThreads, 0, stream>>>(gu, n, inter, m);
  CUDA_RETURN_IF_LAUNCH_ERROR("SwiGluForwardKernel");
  return absl::OkStatus();
}

absl::Status SwiGluBackward(const bf16* dm, const bf16* gu, int64_t n, int64_t inter, bf16* dgu,
                            cudaStream_t stream) {
  if (absl::Status s = CheckPositive("SwiGluBackward", n, inter); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  SwiGluBackwardKernel<<<Blocks(n * inter, kThreads), kThreads, 0, stream>>>(dm, gu, n, inter,
                                                                             dgu);
  CUDA_RETURN_IF_LAUNCH_ERROR("SwiGluBackwardKernel");
  return absl::OkStatus();
}

absl::Status CrossEntropyGradColumns(bf16* logits, int64_t ld, const float* lse,
                                     const int32_t* targets, int64_t n, int64_t v0, int64_t vb,
                                     float grad_scale, cudaStream_t stream) {
  if (absl::Status s = CheckPositive("CrossEntropyGradColumns", n, vb); !s.ok()) return s;
  if (ld < vb || v0 < 0) {
    return absl::InvalidArgumentError(absl::StrCat("CrossEntropyGradColumns: ld ", ld,
                                                   " < columns ", vb, " or first column ", v0,
                                                   " < 0"));
  }
  if (n == 0) return absl::OkStatus();
  CrossEntropyGradColumnsKernel<<<Blocks(n * vb, kThreads * 4), kThreads, 0, stream>>>(
      logits, ld, lse, targets, n, v0, vb, grad_scale);
  CUDA_RETURN_IF_LAUNCH_ERROR("CrossEntropyGradColumnsKernel");
  return absl::OkStatus();
}

absl::Status CrossEntropy(bf16* logits, int64_t ld, const int32_t* targets, int64_t n,
                          int64_t vocab, float grad_scale, float* losses, cudaStream_t stream,
                          float* lse) {
  if (absl::Status s = CheckPositive("CrossEntropy", n, vocab); !s.ok()) return s;
  if (ld < vocab || n > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("CrossEntropy: ld ", ld, " < vocab ", vocab, " or n ", n, " too large"));
  }
  if (n == 0) return absl::OkStatus();
  CrossEntropyKernel<<<static_cast<unsigned>(n), kCeThreads, 0, stream>>>(logits, ld, targets,
                                                                          vocab, grad_scale,
                                                                          losses, lse);
  CUDA_RETURN_IF_LAUNCH_ERROR("CrossEntropyKernel");
  return absl::OkStatus();
}

absl::Status SumSquares(const float* x, int64_t n, double* acc, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  SumKernel<true><<<Blocks(n, kThreads * 16), kThreads, 0, stream>>>(x, n, acc);
  CUDA_RETURN_IF_LAUNCH_ERROR("SumKernel<square>");
  return absl::OkStatus();
}

absl::Status Sum(const float* x, int64_t n, double* acc, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  SumKernel<false><<<Blocks(n, kThreads * 16), kThreads, 0, stream>>>(x, n, acc);
  CUDA_RETURN_IF_LAUNCH_ERROR("SumKernel<plain>");
  return absl::OkStatus();
}

AdamWScalars MakeAdamWScalars(double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t step, double grad_scale) {
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.apply_decay = weight_decay != 0.0;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.grad_scale = static_cast<float>(grad_scale);
  return s;
}

absl::Status AdamW(float* master, const float* grad, float* exp_avg, float* exp_avg_sq,
                   bf16* param, int64_t n, const AdamWScalars& s, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("AdamW: n=", n));
  if (n == 0) return absl::OkStatus();
  AdamWKernel<<<Blocks(n, kThreads * 4), kThreads, 0, stream>>>(master, grad, exp_avg,
                                                                exp_avg_sq, param, n, s);
  CUDA_RETURN_IF_LAUNCH_ERROR("AdamWKernel");
  return absl::OkStatus();
}

absl::Status FillNormal(float* x, int64_t n, uint64_t seed, float stddev, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  FillNormalKernel<<<Blocks(n, kThreads * 4), kThreads, 0, stream>>>(x, n, seed, stddev);
  CUDA_RETURN_IF_LAUNCH_ERROR("FillNormalKernel");
  return absl::OkStatus();
}

absl::Status Fill(float* x, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  FillKernel<<<Blocks(n, kThreads * 4), kThreads, 0, stream>>>(x, n, value);
  CUDA_RETURN_IF_LAUNCH_ERROR("FillKernel");
  return absl::OkStatus();
}

absl::Status F32ToBf16(const float* x, int64_t n, bf16* y, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  F32ToBf16Kernel<<<Blocks(n, kThreads * 4), kThreads, 0, stream>>>(x, n, y);
  CUDA_RETURN_IF_LAUNCH_ERROR("F32ToBf16Kernel");
  return absl::OkStatus();
}

absl::Status Bf16ToF32(const bf16* x, int64_t n, float* y, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  Bf16ToF32Kernel<<<Blocks(n, kThreads * 4), kThreads, 0, stream>>>(x, n, y);
  CUDA_RETURN_IF_LAUNCH_ERROR("Bf16ToF32Kernel");
  return absl::OkStatus();
}

}  // namespace lumen::cuda::kernels
