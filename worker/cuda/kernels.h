// CUDA kernels of the Llama model in bf16 with fp32 arithmetic, and the fp32 AdamW update.
// Each function launches on the given stream and returns at once; it checks the shapes
// (INVALID_ARGUMENT naming the op and the numbers) and the launch (INTERNAL naming the kernel).
// Faults inside a kernel surface at the next synchronising call. Pointers are device memory,
// row-major; `n` is a row count, `c` a column count. Thread-safe: the functions keep no state.
// The CPU reference of each is in worker/engine/kernels.h / optimizer.cc
// (worker/cuda/kernels_test.cc checks them).
#ifndef LUMEN_WORKER_CUDA_KERNELS_H_
#define LUMEN_WORKER_CUDA_KERNELS_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace lumen::cuda {

using bf16 = __nv_bfloat16;

namespace kernels {

// out[r] = table[ids[r]] for r < n; ids must lie in [0, rows of table) (the caller checks).
absl::Status EmbeddingForward(const bf16* table, const int32_t* ids, int64_t n, int64_t c,
                              bf16* out, cudaStream_t stream);
// dtable[ids[r]] += dout[r] (fp32 atomics: the order of additions is not fixed).
absl::Status EmbeddingBackward(const bf16* dout, const int32_t* ids, int64_t n, int64_t c,
                               float* dtable, cudaStream_t stream);

// y = w * (x * rstd), rstd[r] = 1 / sqrt(mean(x[r]^2) + eps), statistics in fp32.
absl::Status RmsNormForward(const bf16* x, const bf16* w, int64_t n, int64_t c, float eps,
                            bf16* y, float* rstd, cudaStream_t stream);
// dx = residual + d/dx (residual may be null; dx may alias residual), dw += d/dw (fp32).
absl::Status RmsNormBackward(const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                             int64_t n, int64_t c, const bf16* residual, bf16* dx, float* dw,
                             cudaStream_t stream);

// In place on rows of `heads` vectors of head_dim (Hugging Face rotate-half), row r at position
// r % seq, rows `row_stride` elements apart. cos/sin tables are fp32 [seq, head_dim/2].
// inverse = true applies the transpose (the backward).
enum class RopeDirection { kForward, kInverse };
absl::Status Rope(bf16* x, int64_t rows, int64_t row_stride, int64_t seq, int64_t heads,
                  int64_t head_dim, const float* cos_table, const float* sin_table,
                  RopeDirection direction, cudaStream_t stream);

// gu[n, 2*I] holds gate (columns 0..I-1) and up (I..2I-1); m[n, I] = silu(gate) * up.
absl::Status SwiGluForward(const bf16* gu, int64_t n, int64_t inter, bf16* m,
                           cudaStream_t stream);
// dgu[n, 2*I] = (d gate, d up) for dm[n, I].
absl::Status SwiGluBackward(const bf16* dm, const bf16* gu, int64_t n, int64_t inter, bf16* dgu,
                            cudaStream_t stream);

// losses[r] = logsumexp(logits[r]) - logits[r, targets[r]] in fp32 over rows `ld` apart.
// With grad_scale != 0 the logits are overwritten with grad_scale * (softmax - onehot).
// targets must lie in [0, vocab) (the caller checks). `lse` (optional, [n]) receives each
// row's log-sum-exp, for CrossEntropyGradColumns.
absl::Status CrossEntropy(bf16* logits, int64_t ld, const int32_t* targets, int64_t n,
                          int64_t vocab, float grad_scale, float* losses, cudaStream_t stream,
                          float* lse = nullptr);
// CrossEntropy's gradient for columns [v0, v0 + vb) of the vocabulary when only those logits
// are at hand (`logits` [n, vb], rows `ld` apart, overwritten), from each row's log-sum-exp
// over the whole vocabulary (`lse`, as CrossEntropy returns it): grad_scale * (exp(logit -
// lse) - onehot(target)). The same formula as CrossEntropy's, element for element.
absl::Status CrossEntropyGradColumns(bf16* logits, int64_t ld, const float* lse,
                                     const int32_t* targets, int64_t n, int64_t v0, int64_t vb,
                                     float grad_scale, cudaStream_t stream);

// *acc += sum of x[i]^2 (double atomics).
absl::Status SumSquares(const float* x, int64_t n, double* acc, cudaStream_t stream);
// *acc += sum of x[i].
absl::Status Sum(const float* x, int64_t n, double* acc, cudaStream_t stream);

// Scalars of one AdamW update, computed on the host in double exactly as
// engine::AdamWUpdate does and rounded to float.
struct AdamWScalars {
  float decay = 1.0f;  // 1 - lr * weight_decay
  bool apply_decay = false;
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.999f, one_minus_beta2 = 0.001f;
  float neg_step_size = 0.0f;  // -lr / (1 - beta1^step)
  float bc2_sqrt = 1.0f;       // sqrt(1 - beta2^step)
  float eps = 1e-8f;
  // Multiplies every gradient first (global-norm clipping; 1 for none).
  float grad_scale = 1.0f;
};
AdamWScalars MakeAdamWScalars(double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t step, double grad_scale);

// engine::AdamWUpdate on fp32 master weights, the same operations in the same order (no
// fused multiply-adds here; the CPU build may fuse some, so results can differ by an ulp),
// writing the bf16 compute copy `param` as well (param may be null).
absl::Status AdamW(float* master, const float* grad, float* exp_avg, float* exp_avg_sq,
                   bf16* param, int64_t n, const AdamWScalars& s, cudaStream_t stream);

// x[i] = stddev * (a normal deviate from a counter-based hash of (seed, i)): device-side
// initialisation for benchmarks, reproducible for a given seed.
absl::Status FillNormal(float* x, int64_t n, uint64_t seed, float stddev, cudaStream_t stream);
absl::Status Fill(float* x, int64_t n, float value, cudaStream_t stream);

absl::Status F32ToBf16(const float* x, int64_t n, bf16* y, cudaStream_t stream);
absl::Status Bf16ToF32(const bf16* x, int64_t n, float* y, cudaStream_t stream);

}  // namespace kernels
}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_KERNELS_H_
