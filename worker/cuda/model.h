// The Llama decoder (as engine::LlamaModelT) on a CUDA device in bf16 with fp32 accumulation,
// exposed through the same per-layer calls as the CPU model (EmbedForward, DecoderLayerForward
// / Backward with recompute, HeadForwardBackward, EmbedBackward), so one layer-wise schedule
// drives either device. The model owns only scratch; where each layer's bf16 parameters and
// fp32 gradients live is bound per call (Bind*), so a caller may keep them resident or stream
// them through slots. Thread-compatible: one thread issues a model's calls; all work goes to
// the device's compute stream and the calls return before it finishes.
#ifndef LUMEN_WORKER_CUDA_MODEL_H_
#define LUMEN_WORKER_CUDA_MODEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/device.h"
#include "worker/cuda/kernels.h"
#include "worker/cuda/layout.h"
#include "worker/engine/model.h"

namespace lumen::cuda {

// A layer's tensors on the device, in LayerLayout. grads may be null for forward-only calls.
struct LayerView {
  bf16* params = nullptr;
  float* grads = nullptr;
};

struct CudaLlamaOptions {
  // Keep every layer's forward activations until its backward (no recompute when the backward
  // gets the same input pointer as the forward): ~1/4 less compute for activation memory of
  // all layers; for training that fits in device memory. false: one layer's worth of scratch
  // and the backward recomputes (the CPU model's layer-wise contract).
  bool keep_activations = false;
  // Tokens per chunk of logits in HeadForwardBackward: the logits scratch is
  // chunk x vocab bf16 (4096 x 128256 = 1 GiB).
  int64_t head_chunk_tokens = 4096;
  // Which attention kernels (attention.h): kAuto picks tensor cores where they fit.
  kernels::AttentionKernel attention = kernels::AttentionKernel::kAuto;
};

// OK when the CUDA kernels support `config` (engine::CheckModelConfig, and a head_dim of 32,
// 64 or 128); otherwise INVALID_ARGUMENT naming the fields to change.
absl::Status CheckCudaModelConfig(const engine::ModelConfig& config);

class CudaLlama {
 public:
  // INVALID_ARGUMENT for a config the kernels do not support (head_dim not 32/64/128).
  // `device` must outlive the model.
  static absl::StatusOr<std::unique_ptr<CudaLlama>> Create(
      CudaDevice* device, const engine::ModelConfig& config,
      const CudaLlamaOptions& options = CudaLlamaOptions());
  ~CudaLlama();

  const engine::ModelConfig& config() const { return config_; }
  const LayerLayout& layout() const { return layout_; }
  CudaDevice& device() const { return *device_; }

  // Where the tensors are for the following calls. embed [vocab, hidden]; norm [hidden];
  // lm_head [vocab, hidden] (ignored when tie_word_embeddings: the head is the embedding).
  void BindLayer(int layer, LayerView view);
  void BindEmbedding(bf16* weight, float* grad);
  void BindHead(bf16* norm, float* norm_grad, bf16* lm_head, float* lm_head_grad);

  // Device bytes of the scratch of decoder-layer calls (activations of one layer, backward
  // buffers, RoPE tables) and of the head (normed input, a chunk of logits, losses) for one
  // micro-batch of batch x seq.
  int64_t LayerScratchBytes(int64_t batch, int64_t seq) const;
  int64_t HeadScratchBytes(int64_t batch, int64_t seq) const;
  // Allocates the scratch for batch x seq (op names "layer scratch" / "head scratch"); the
  // calls below do it on first use. RESOURCE_EXHAUSTED when the budget is short.
  absl::Status EnsureScratch(int64_t batch, int64_t seq);
  void ReleaseScratch();

  // All pointers are device memory; activations are bf16 [batch*seq, hidden]. Token ids must
  // lie in [0, vocab) (the caller checks them on the host before the upload).
  absl::Status EmbedForward(const int32_t* ids, int64_t batch, int64_t seq, bf16* x);
  // embedding grad += scattered dx (fp32 atomics).
  absl::Status EmbedBackward(const int32_t* ids, int64_t batch, int64_t seq, const bf16* dx);
  absl::Status DecoderLayerForward(int layer, const bf16* x, bf16* out, int64_t batch,
                                   int64_t seq);
  // Recomputes the layer from x, adds parameter gradients for dy into the layer's grads and
  // writes the input gradient to dx. dy is clobbered; dx must not alias x or dy.
  absl::Status DecoderLayerBackward(int layer, const bf16* x, bf16* dy, bf16* dx, int64_t batch,
                                    int64_t seq);
  // Final norm, LM head and mean token cross-entropy (head_chunk_tokens rows at a time):
  // adds grad_scale * d(mean loss)/d(param) to the norm and head gradients, writes
  // d(grad_scale * mean loss)/dx to dx, and adds the sum of the token losses to *loss_sum
  // (device double).
  absl::Status HeadForwardBackward(const bf16* x, const int32_t* targets, int64_t batch,
                                   int64_t seq, float grad_scale, bf16* dx, double* loss_sum);
  // The same without the LM head's weight gradient, for a head whose fp32 gradient does not
  // fit the device: the bound head gradient may be null. Leaves what HeadWeightGradRows needs:
  // the normed input in `hn` ([batch*seq, hidden] bf16; it may be x, which is written after
  // its last read) and each row's log-sum-exp in `lse` ([batch*seq] fp32).
  absl::Status HeadForwardBackwardNoWeightGrad(const bf16* x, const int32_t* targets,
                                               int64_t batch, int64_t seq, float grad_scale,
                                               bf16* dx, double* loss_sum, bf16* hn, float* lse);
  // Adds rows [v0, v0 + rows) of the LM head's weight gradient for one micro-batch to
  // `d_rows` ([rows, hidden] fp32), given those rows of the head's weight (`head_rows`,
  // [rows, hidden] bf16) and the micro-batch's `hn` and `lse` from
  // HeadForwardBackwardNoWeightGrad: the logits of those columns are recomputed, turned into
  // grad_scale * d(mean loss)/d(logits) as CrossEntropy does, and multiplied by hn. Summed over
  // all row blocks this is HeadForwardBackward's head gradient.
  absl::Status HeadWeightGradRows(const bf16* hn, const int32_t* targets, const float* lse,
                                  int64_t batch, int64_t seq, float grad_scale,
                                  const bf16* head_rows, int64_t v0, int64_t rows,
                                  float* d_rows);

 private:
  absl::Status Head(const bf16* x, const int32_t* targets, int64_t batch, int64_t seq,
                    float grad_scale, bf16* dx, double* loss_sum, bool weight_grad, bf16* hn_out,
                    float* lse_out);
  struct Acts;
  struct Scratch;
  CudaLlama(CudaDevice* device, const engine::ModelConfig& config,
            const CudaLlamaOptions& options);
  absl::Status CheckShape(int64_t batch, int64_t seq) const;
  absl::Status CheckLayer(int layer, bool with_grads) const;
  absl::Status LayerForward(int layer, const bf16* x, bf16* out, int64_t batch, int64_t seq,
                            Acts& a);
  int64_t ActsBytes(int64_t batch, int64_t seq) const;

  // Constant after construction.
  CudaDevice* const device_;
  const engine::ModelConfig config_;
  const CudaLlamaOptions options_;
  const LayerLayout layout_;

  std::vector<LayerView> layers_;
  bf16* embed_ = nullptr;
  float* embed_grad_ = nullptr;
  bf16* norm_ = nullptr;
  float* norm_grad_ = nullptr;
  bf16* lm_head_ = nullptr;
  float* lm_head_grad_ = nullptr;
  std::unique_ptr<Scratch> scratch_;
};

// RoPE tables exactly as engine::kernels::RopeTables<float>: [seq, head_dim/2] each.
void RopeTablesF32(int64_t seq, int64_t head_dim, double theta, float* cos_table,
                   float* sin_table);

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_MODEL_H_
