// Causal grouped-query attention in bf16, flash-attention style: the T x T score matrix is
// never stored; the forward keeps only each row's log-sum-exp, the backward recomputes the
// probabilities tile by tile. Query head h uses key/value head h / (heads / kv_heads); scale
// 1/sqrt(head_dim). Launchers as in kernels.h (explicit stream, shape checks, launch checks).
// head_dim must be 32, 64 or 128. Two implementations (AttentionKernel): tensor cores (WMMA
// bf16, attention_tc.cu) and CUDA cores (fp32 FMAs, attention.cu); kAuto takes tensor cores
// when the device offers their shared memory (up to 160 KiB per block for head_dim 128: A100,
// H100; not sm_89) and CUDA cores otherwise. Thread-safe: no state.
// CPU reference: engine::kernels::AttentionForward / AttentionBackward.
#ifndef LUMEN_WORKER_CUDA_ATTENTION_H_
#define LUMEN_WORKER_CUDA_ATTENTION_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace lumen::cuda::kernels {

// Where the per-head vectors of one token live: q of head h of token r (r = b*seq + t) at
// q + r * ld + h * head_dim, and likewise for k and v (kv heads). q, k and v may be views into
// one fused qkv matrix.
struct QkvView {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  int64_t ld;
};

struct AttentionShape {
  int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
};

enum class AttentionKernel { kAuto, kCudaCores, kTensorCores };

// out[r, h*head_dim + d] (rows heads*head_dim apart); lse[(b*heads + h)*seq + t] in fp32.
// kTensorCores on a device without the shared memory: FAILED_PRECONDITION.
absl::Status AttentionForward(const QkvView& qkv, const AttentionShape& shape,
                              __nv_bfloat16* out, float* lse, cudaStream_t stream,
                              AttentionKernel kernel = AttentionKernel::kAuto);

// Gradients for dout (same layout as out). delta is fp32 scratch of batch*heads*seq. dq, dk
// and dv are overwritten; they share the layout of q, k and v with leading dimension d_ld.
absl::Status AttentionBackward(const QkvView& qkv, const AttentionShape& shape,
                               const __nv_bfloat16* out, const __nv_bfloat16* dout,
                               const float* lse, float* delta, __nv_bfloat16* dq,
                               __nv_bfloat16* dk, __nv_bfloat16* dv, int64_t d_ld,
                               cudaStream_t stream,
                               AttentionKernel kernel = AttentionKernel::kAuto);

namespace internal {
// attention_tc.cu; shapes already checked.
bool TensorCoreAttentionFits(int64_t head_dim);
absl::Status TensorCoreAttentionForward(const QkvView& qkv, const AttentionShape& shape,
                                        __nv_bfloat16* out, float* lse, cudaStream_t stream);
absl::Status TensorCoreAttentionBackward(const QkvView& qkv, const AttentionShape& shape,
                                         const __nv_bfloat16* dout, const float* lse,
                                         const float* delta, __nv_bfloat16* dq,
                                         __nv_bfloat16* dk, __nv_bfloat16* dv, int64_t d_ld,
                                         cudaStream_t stream);
}  // namespace internal

}  // namespace lumen::cuda::kernels

#endif  // LUMEN_WORKER_CUDA_ATTENTION_H_
