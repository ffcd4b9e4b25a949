#include "worker/cuda/model.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/gemm.h"

namespace lumen::cuda {

void RopeTablesF32(int64_t seq, int64_t head_dim, double theta, float* cos_table,
                   float* sin_table) {
  // engine::kernels::RopeTables<float>, operation for operation.
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float inv_freq =
        1.0f / static_cast<float>(std::pow(static_cast<float>(theta),
                                           static_cast<float>(2 * i) /
                                               static_cast<float>(head_dim)));
    for (int64_t p = 0; p < seq; ++p) {
      const float angle = static_cast<float>(p) * inv_freq;
      cos_table[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_table[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

// Forward activations of one layer that its backward reads.
struct CudaLlama::Acts {
  DeviceBuffer h1, rstd1, qkv, att, lse, x2, h2, rstd2, gu, m;
};

struct CudaLlama::Scratch {
  int64_t batch = 0, seq = 0;
  // One set, or one per layer with keep_activations; kept_input[l] is the x of the forward
  // whose activations acts[l] holds (null: none).
  std::vector<Acts> acts;
  std::vector<const bf16*> kept_input;
  // Backward buffers and the recompute output.
  DeviceBuffer out, dm, dgu, dh, datt, dqkv, delta, rope_cos, rope_sin;
  // Head.
  DeviceBuffer hn, rstdn, logits, dhn, losses;
};

CudaLlama::CudaLlama(CudaDevice* device, const engine::ModelConfig& config,
                     const CudaLlamaOptions& options)
    : device_(device), config_(config), options_(options), layout_(LayerLayout::For(config)) {
  layers_.resize(config.num_hidden_layers);
}

CudaLlama::~CudaLlama() = default;

absl::Status CheckCudaModelConfig(const engine::ModelConfig& config) {
  RETURN_IF_ERROR(engine::CheckModelConfig(config));
  const int64_t d = config.head_dim();
  if (d != 32 && d != 64 && d != 128) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model: head_dim ", d, " (hidden_size ", config.hidden_size, " / num_attention_heads ",
        config.num_attention_heads,
        ") is not supported by the CUDA attention, which needs 32, 64 or 128; change "
        "num_attention_heads"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaLlama>> CudaLlama::Create(
    CudaDevice* device, const engine::ModelConfig& config, const CudaLlamaOptions& options) {
  RETURN_IF_ERROR(CheckCudaModelConfig(config));
  if (options.head_chunk_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_chunk_tokens ", options.head_chunk_tokens, " must be > 0"));
  }
  return std::unique_ptr<CudaLlama>(new CudaLlama(device, config, options));
}

void CudaLlama::BindLayer(int layer, LayerView view) { layers_[layer] = view; }

void CudaLlama::BindEmbedding(bf16* weight, float* grad) {
  embed_ = weight;
  embed_grad_ = grad;
}

void CudaLlama::BindHead(bf16* norm, float* norm_grad, bf16* lm_head, float* lm_head_grad) {
  norm_ = norm;
  norm_grad_ = norm_grad;
  lm_head_ = lm_head;
  lm_head_grad_ = lm_head_grad;
}

int64_t CudaLlama::ActsBytes(int64_t batch, int64_t seq) const {
  const engine::ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t qkvd = layout_.q_dim + 2 * layout_.kv_dim, qd = layout_.q_dim;
  const int64_t bhT = batch * c.num_attention_heads * seq;
  // h1 qkv att x2 h2 gu m in bf16; rstd1 rstd2 lse in fp32; 10 buffers rounded to 256.
  return 2 * n * (3 * h + qkvd + qd + 3 * I) + 4 * (2 * n + bhT) + 10 * 256;
}

int64_t CudaLlama::LayerScratchBytes(int64_t batch, int64_t seq) const {
  const engine::ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t qkvd = layout_.q_dim + 2 * layout_.kv_dim, qd = layout_.q_dim;
  const int64_t bhT = batch * c.num_attention_heads * seq;
  const int64_t sets = options_.keep_activations ? c.num_hidden_layers : 1;
  // out dm dgu dh datt dqkv in bf16; delta and the RoPE tables in fp32; 9 buffers.
  const int64_t back = 2 * n * (h + I + 2 * I + h + qd + qkvd) + 4 * (bhT + seq * c.head_dim()) +
                       9 * 256;
  return sets * ActsBytes(batch, seq) + back;
}

int64_t CudaLlama::HeadScratchBytes(int64_t batch, int64_t seq) const {
  const int64_t n = batch * seq, h = config_.hidden_size;
  const int64_t chunk = std::min(n, options_.head_chunk_tokens);
  return 2 * (2 * n * h + chunk * config_.vocab_size) + 4 * (2 * n) + 5 * 256;
}

absl::Status CudaLlama::EnsureScratch(int64_t batch, int64_t seq) {
  if (scratch_ != nullptr && scratch_->batch == batch && scratch_->seq == seq) {
    return absl::OkStatus();
  }
  scratch_.reset();
  auto s = std::make_unique<Scratch>();
  const engine::ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t qkvd = layout_.q_dim + 2 * layout_.kv_dim, qd = layout_.q_dim;
  const int64_t bhT = batch * c.num_attention_heads * seq;
  const int64_t half = c.head_dim() / 2;
  struct Want {
    DeviceBuffer* buf;
    int64_t bytes;
    const char* what;
  };
  const int64_t chunk = std::min(n, options_.head_chunk_tokens);
  const Want wants[] = {
      {&s->out, 2 * n * h, "layer scratch: recompute out"},
      {&s->dm, 2 * n * I, "layer scratch: dm"},
      {&s->dgu, 2 * n * 2 * I, "layer scratch: dgate_up"},
      {&s->dh, 2 * n * h, "layer scratch: dh"},
      {&s->datt, 2 * n * qd, "layer scratch: datt"},
      {&s->dqkv, 2 * n * qkvd, "layer scratch: dqkv"},
      {&s->delta, 4 * bhT, "layer scratch: delta"},
      {&s->rope_cos, 4 * seq * half, "layer scratch: rope cos"},
      {&s->rope_sin, 4 * seq * half, "layer scratch: rope sin"},
      {&s->hn, 2 * n * h, "head scratch: normed input"},
      {&s->rstdn, 4 * n, "head scratch: rstd"},
      {&s->logits, 2 * chunk * c.vocab_size, "head scratch: logits"},
      {&s->dhn, 2 * n * h, "head scratch: dhn"},
      {&s->losses, 4 * n, "head scratch: losses"},
  };
  for (const Want& w : wants) {
    ASSIGN_OR_RETURN(*w.buf, device_->Allocate(w.bytes, absl::StrCat(w.what, " for batch ",
                                                                      batch, " x seq ", seq)));
  }
  const int64_t sets = options_.keep_activations ? c.num_hidden_layers : 1;
  s->acts.resize(sets);
  s->kept_input.assign(sets, nullptr);
  for (int64_t i = 0; i < sets; ++i) {
    Acts& a = s->acts[i];
    const Want acts[] = {
        {&a.h1, 2 * n * h, "activations: h1"},
        {&a.rstd1, 4 * n, "activations: rstd1"},
        {&a.qkv, 2 * n * qkvd, "activations: qkv"},
        {&a.att, 2 * n * qd, "activations: att"},
        {&a.lse, 4 * bhT, "activations: lse"},
        {&a.x2, 2 * n * h, "activations: x2"},
        {&a.h2, 2 * n * h, "activations: h2"},
        {&a.rstd2, 4 * n, "activations: rstd2"},
        {&a.gu, 2 * n * 2 * I, "activations: gate_up"},
        {&a.m, 2 * n * I, "activations: m"},
    };
    for (const Want& w : acts) {
      ASSIGN_OR_RETURN(*w.buf, device_->Allocate(w.bytes, absl::StrCat(w.what, " set ", i,
                                                                        " for batch ", batch,
                                                                        " x seq ", seq)));
    }
  }
  std::vector<float> cs(seq * half), sn(seq * half);
  RopeTablesF32(seq, c.head_dim(), c.rope_theta, cs.data(), sn.data());
  // Once per shape. On the compute stream, which is not ordered with the legacy default
  // stream a plain cudaMemcpy would use; from pageable memory the call returns once the bytes
  // are staged, so the vectors may go.
  cudaStream_t st = device_->compute_stream();
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s->rope_cos.get(), cs.data(), 4 * cs.size(),
                                       cudaMemcpyHostToDevice, st),
                       "upload RoPE tables");
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s->rope_sin.get(), sn.data(), 4 * sn.size(),
                                       cudaMemcpyHostToDevice, st),
                       "upload RoPE tables");
  s->batch = batch;
  s->seq = seq;
  scratch_ = std::move(s);
  return absl::OkStatus();
}

void CudaLlama::ReleaseScratch() { scratch_.reset(); }

absl::Status CudaLlama::CheckShape(int64_t batch, int64_t seq) const {
  if (seq > config_.max_position_embeddings || seq <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " x seq ", seq,
                                                   " invalid (max_position_embeddings ",
                                                   config_.max_position_embeddings, ")"));
  }
  return absl::OkStatus();
}

absl::Status CudaLlama::CheckLayer(int layer, bool with_grads) const {
  if (layer < 0 || layer >= config_.num_hidden_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " outside [0, ", config_.num_hidden_layers, ")"));
  }
  if (layers_[layer].params == nullptr || (with_grads && layers_[layer].grads == nullptr)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, ": ", with_grads ? "parameters and gradients" : "parameters",
        " not bound"));
  }
  return absl::OkStatus();
}

absl::Status CudaLlama::EmbedForward(const int32_t* ids, int64_t batch, int64_t seq, bf16* x) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  if (embed_ == nullptr) return absl::FailedPreconditionError("embed_tokens not bound");
  return kernels::EmbeddingForward(embed_, ids, batch * seq, config_.hidden_size, x,
                                   device_->compute_stream());
}

absl::Status CudaLlama::EmbedBackward(const int32_t* ids, int64_t batch, int64_t seq,
                                      const bf16* dx) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  if (embed_grad_ == nullptr) {
    return absl::FailedPreconditionError("embed_tokens gradient not bound");
  }
  return kernels::EmbeddingBackward(dx, ids, batch * seq, config_.hidden_size, embed_grad_,
                                    device_->compute_stream());
}

absl::Status CudaLlama::LayerForward(int layer, const bf16* x, bf16* out, int64_t batch,
                                     int64_t seq, Acts& s) {
  const engine::ModelConfig& c = config_;
  const Scratch& sc = *scratch_;
  const LayerLayout& L = layout_;
  const bf16* P = layers_[layer].params;
  const int64_t n = batch * seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, D = c.head_dim();
  const int64_t qd = L.q_dim, kd = L.kv_dim, qkvd = qd + 2 * kd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  cudaStream_t st = device_->compute_stream();
  Gemm& g = device_->gemm();
  const std::string op = absl::StrCat("forward of layer ", layer);
  bf16* qkv = s.qkv.as<bf16>();
  RETURN_IF_ERROR(kernels::RmsNormForward(x, P + L.input_layernorm, n, h, eps, s.h1.as<bf16>(),
                                          s.rstd1.as<float>(), st));
  RETURN_IF_ERROR(g.Run(false, true, n, qkvd, h, s.h1.as<bf16>(), h, P + L.qkv, h, 0.0f, nullptr,
                        qkv, qkvd, GemmOut::kBf16, st, op + ": qkv"));
  RETURN_IF_ERROR(kernels::Rope(qkv, n, qkvd, seq, H, D, sc.rope_cos.as<float>(),
                                sc.rope_sin.as<float>(), kernels::RopeDirection::kForward, st));
  RETURN_IF_ERROR(kernels::Rope(qkv + qd, n, qkvd, seq, KV, D, sc.rope_cos.as<float>(),
                                sc.rope_sin.as<float>(), kernels::RopeDirection::kForward, st));
  const kernels::QkvView view{qkv, qkv + qd, qkv + qd + kd, qkvd};
  const kernels::AttentionShape shape{batch, seq, H, KV, D};
  RETURN_IF_ERROR(
      kernels::AttentionForward(view, shape, s.att.as<bf16>(), s.lse.as<float>(), st,
                                options_.attention));
  RETURN_IF_ERROR(g.Run(false, true, n, h, qd, s.att.as<bf16>(), qd, P + L.o_proj, qd, 1.0f, x,
                        s.x2.as<bf16>(), h, GemmOut::kBf16, st, op + ": o_proj"));
  RETURN_IF_ERROR(kernels::RmsNormForward(s.x2.as<bf16>(), P + L.post_attention_layernorm, n, h,
                                          eps, s.h2.as<bf16>(), s.rstd2.as<float>(), st));
  RETURN_IF_ERROR(g.Run(false, true, n, 2 * I, h, s.h2.as<bf16>(), h, P + L.gate_up, h, 0.0f,
                        nullptr, s.gu.as<bf16>(), 2 * I, GemmOut::kBf16, st, op + ": gate_up"));
  RETURN_IF_ERROR(kernels::SwiGluForward(s.gu.as<bf16>(), n, I, s.m.as<bf16>(), st));
  RETURN_IF_ERROR(g.Run(false, true, n, h, I, s.m.as<bf16>(), I, P + L.down_proj, I, 1.0f,
                        s.x2.as<bf16>(), out, h, GemmOut::kBf16, st, op + ": down_proj"));
  return absl::OkStatus();
}

absl::Status CudaLlama::DecoderLayerForward(int layer, const bf16* x, bf16* out, int64_t batch,
                                            int64_t seq) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  RETURN_IF_ERROR(CheckLayer(layer, false));
  RETURN_IF_ERROR(EnsureScratch(batch, seq));
  Scratch& s = *scratch_;
  const int set = options_.keep_activations ? layer : 0;
  s.kept_input[set] = nullptr;
  RETURN_IF_ERROR(LayerForward(layer, x, out, batch, seq, s.acts[set]));
  if (options_.keep_activations) s.kept_input[set] = x;
  return absl::OkStatus();
}

absl::Status CudaLlama::DecoderLayerBackward(int layer, const bf16* x, bf16* dy, bf16* dx,
                                             int64_t batch, int64_t seq) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  RETURN_IF_ERROR(CheckLayer(layer, true));
  RETURN_IF_ERROR(EnsureScratch(batch, seq));
  Scratch& s = *scratch_;
  const int set = options_.keep_activations ? layer : 0;
  Acts& a = s.acts[set];
  if (s.kept_input[set] != x) {
    RETURN_IF_ERROR(LayerForward(layer, x, s.out.as<bf16>(), batch, seq, a));
  }
  s.kept_input[set] = nullptr;  // dy and the backward clobber nothing of a, but x may change
  const engine::ModelConfig& c = config_;
  const LayerLayout& L = layout_;
  const bf16* P = layers_[layer].params;
  float* G = layers_[layer].grads;
  const int64_t n = batch * seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, D = c.head_dim();
  const int64_t qd = L.q_dim, kd = L.kv_dim, qkvd = qd + 2 * kd;
  cudaStream_t st = device_->compute_stream();
  Gemm& g = device_->gemm();
  const std::string op = absl::StrCat("backward of layer ", layer);
  // MLP: out = x2 + down(m).
  RETURN_IF_ERROR(g.Run(true, false, h, I, n, dy, h, a.m.as<bf16>(), I, 1.0f, G + L.down_proj,
                        G + L.down_proj, I, GemmOut::kF32, st, op + ": d down_proj"));
  RETURN_IF_ERROR(g.Run(false, false, n, I, h, dy, h, P + L.down_proj, I, 0.0f, nullptr,
                        s.dm.as<bf16>(), I, GemmOut::kBf16, st, op + ": dm"));
  RETURN_IF_ERROR(
      kernels::SwiGluBackward(s.dm.as<bf16>(), a.gu.as<bf16>(), n, I, s.dgu.as<bf16>(), st));
  RETURN_IF_ERROR(g.Run(true, false, 2 * I, h, n, s.dgu.as<bf16>(), 2 * I, a.h2.as<bf16>(), h,
                        1.0f, G + L.gate_up, G + L.gate_up, h, GemmOut::kF32, st,
                        op + ": d gate_up"));
  RETURN_IF_ERROR(g.Run(false, false, n, h, 2 * I, s.dgu.as<bf16>(), 2 * I, P + L.gate_up, h,
                        0.0f, nullptr, s.dh.as<bf16>(), h, GemmOut::kBf16, st, op + ": dh2"));
  // dx2 = dy + norm backward, in place over dy.
  RETURN_IF_ERROR(kernels::RmsNormBackward(s.dh.as<bf16>(), a.x2.as<bf16>(),
                                           P + L.post_attention_layernorm, a.rstd2.as<float>(),
                                           n, h, dy, dy, G + L.post_attention_layernorm, st));
  // Attention: x2 = x + o(att).
  RETURN_IF_ERROR(g.Run(true, false, h, qd, n, dy, h, a.att.as<bf16>(), qd, 1.0f, G + L.o_proj,
                        G + L.o_proj, qd, GemmOut::kF32, st, op + ": d o_proj"));
  RETURN_IF_ERROR(g.Run(false, false, n, qd, h, dy, h, P + L.o_proj, qd, 0.0f, nullptr,
                        s.datt.as<bf16>(), qd, GemmOut::kBf16, st, op + ": datt"));
  bf16* qkv = a.qkv.as<bf16>();
  bf16* dqkv = s.dqkv.as<bf16>();
  const kernels::QkvView view{qkv, qkv + qd, qkv + qd + kd, qkvd};
  const kernels::AttentionShape shape{batch, seq, H, KV, D};
  RETURN_IF_ERROR(kernels::AttentionBackward(view, shape, a.att.as<bf16>(), s.datt.as<bf16>(),
                                             a.lse.as<float>(), s.delta.as<float>(), dqkv,
                                             dqkv + qd, dqkv + qd + kd, qkvd, st,
                                             options_.attention));
  RETURN_IF_ERROR(kernels::Rope(dqkv, n, qkvd, seq, H, D, s.rope_cos.as<float>(),
                                s.rope_sin.as<float>(), kernels::RopeDirection::kInverse, st));
  RETURN_IF_ERROR(kernels::Rope(dqkv + qd, n, qkvd, seq, KV, D, s.rope_cos.as<float>(),
                                s.rope_sin.as<float>(), kernels::RopeDirection::kInverse, st));
  RETURN_IF_ERROR(g.Run(true, false, qkvd, h, n, dqkv, qkvd, a.h1.as<bf16>(), h, 1.0f,
                        G + L.qkv, G + L.qkv, h, GemmOut::kF32, st, op + ": d qkv"));
  RETURN_IF_ERROR(g.Run(false, false, n, h, qkvd, dqkv, qkvd, P + L.qkv, h, 0.0f, nullptr,
                        s.dh.as<bf16>(), h, GemmOut::kBf16, st, op + ": dh1"));
  RETURN_IF_ERROR(kernels::RmsNormBackward(s.dh.as<bf16>(), x, P + L.input_layernorm,
                                           a.rstd1.as<float>(), n, h, dy, dx,
                                           G + L.input_layernorm, st));
  return absl::OkStatus();
}

absl::Status CudaLlama::HeadForwardBackward(const bf16* x, const int32_t* targets,
                                            int64_t batch, int64_t seq, float grad_scale,
                                            bf16* dx, double* loss_sum) {
  return Head(x, targets, batch, seq, grad_scale, dx, loss_sum, true, nullptr, nullptr);
}

absl::Status CudaLlama::HeadForwardBackwardNoWeightGrad(const bf16* x, const int32_t* targets,
                                                        int64_t batch, int64_t seq,
                                                        float grad_scale, bf16* dx,
                                                        double* loss_sum, bf16* hn, float* lse) {
  if (hn == nullptr || lse == nullptr) {
    return absl::InvalidArgumentError("head without weight gradient: hn and lse are needed");
  }
  return Head(x, targets, batch, seq, grad_scale, dx, loss_sum, false, hn, lse);
}

absl::Status CudaLlama::Head(const bf16* x, const int32_t* targets, int64_t batch, int64_t seq,
                             float grad_scale, bf16* dx, double* loss_sum, bool weight_grad,
                             bf16* hn_out, float* lse_out) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  const engine::ModelConfig& c = config_;
  const bool tied = c.tie_word_embeddings;
  const bf16* head = tied ? embed_ : lm_head_;
  float* dhead = tied ? embed_grad_ : lm_head_grad_;
  if (norm_ == nullptr || norm_grad_ == nullptr || head == nullptr ||
      (weight_grad && dhead == nullptr)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "head: norm, ", tied ? "embed_tokens" : "lm_head", " or their gradients not bound"));
  }
  RETURN_IF_ERROR(EnsureScratch(batch, seq));
  Scratch& s = *scratch_;
  const int64_t n = batch * seq, h = c.hidden_size, V = c.vocab_size;
  cudaStream_t st = device_->compute_stream();
  Gemm& g = device_->gemm();
  bf16* hn = s.hn.as<bf16>();
  bf16* dhn = s.dhn.as<bf16>();
  bf16* logits = s.logits.as<bf16>();
  RETURN_IF_ERROR(kernels::RmsNormForward(x, norm_, n, h, static_cast<float>(c.rms_norm_eps), hn,
                                          s.rstdn.as<float>(), st));
  const float scale = grad_scale / static_cast<float>(n);
  const int64_t chunk = options_.head_chunk_tokens;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const std::string op = absl::StrCat("head rows ", r0, "..", r0 + rows);
    RETURN_IF_ERROR(g.Run(false, true, rows, V, h, hn + r0 * h, h, head, h, 0.0f, nullptr,
                          logits, V, GemmOut::kBf16, st, op + ": logits"));
    RETURN_IF_ERROR(kernels::CrossEntropy(logits, V, targets + r0, rows, V, scale,
                                          s.losses.as<float>() + r0, st,
                                          lse_out != nullptr ? lse_out + r0 : nullptr));
    RETURN_IF_ERROR(g.Run(false, false, rows, h, V, logits, V, head, h, 0.0f, nullptr,
                          dhn + r0 * h, h, GemmOut::kBf16, st, op + ": dhn"));
    if (weight_grad) {
      RETURN_IF_ERROR(g.Run(true, false, V, h, rows, logits, V, hn + r0 * h, h, 1.0f, dhead,
                            dhead, h, GemmOut::kF32, st, op + ": d head"));
    }
  }
  RETURN_IF_ERROR(kernels::Sum(s.losses.as<float>(), n, loss_sum, st));
  RETURN_IF_ERROR(kernels::RmsNormBackward(dhn, x, norm_, s.rstdn.as<float>(), n, h, nullptr, dx,
                                           norm_grad_, st));
  if (hn_out != nullptr) {
    // After RmsNormBackward's reads of x: hn_out may be x.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(hn_out, hn, 2 * n * h, cudaMemcpyDeviceToDevice, st),
                         "head: keep the normed input");
  }
  return absl::OkStatus();
}

absl::Status CudaLlama::HeadWeightGradRows(const bf16* hn, const int32_t* targets,
                                           const float* lse, int64_t batch, int64_t seq,
                                           float grad_scale, const bf16* head_rows, int64_t v0,
                                           int64_t rows, float* d_rows) {
  RETURN_IF_ERROR(CheckShape(batch, seq));
  const engine::ModelConfig& c = config_;
  if (v0 < 0 || rows <= 0 || v0 + rows > c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("head weight gradient: rows ", v0, "..",
                                                   v0 + rows, " outside the vocabulary of ",
                                                   c.vocab_size));
  }
  RETURN_IF_ERROR(EnsureScratch(batch, seq));
  Scratch& s = *scratch_;
  const int64_t n = batch * seq, h = c.hidden_size;
  cudaStream_t st = device_->compute_stream();
  Gemm& g = device_->gemm();
  bf16* logits = s.logits.as<bf16>();  // [chunk, V] holds [chunk, rows]
  const float scale = grad_scale / static_cast<float>(n);
  const int64_t chunk = options_.head_chunk_tokens;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t tokens = std::min(chunk, n - r0);
    const std::string op = absl::StrCat("head weight rows ", v0, "..", v0 + rows, ", tokens ",
                                        r0, "..", r0 + tokens);
    RETURN_IF_ERROR(g.Run(false, true, tokens, rows, h, hn + r0 * h, h, head_rows, h, 0.0f,
                          nullptr, logits, rows, GemmOut::kBf16, st, op + ": logits"));
    RETURN_IF_ERROR(kernels::CrossEntropyGradColumns(logits, rows, lse + r0, targets + r0, tokens,
                                                     v0, rows, scale, st));
    RETURN_IF_ERROR(g.Run(true, false, rows, h, tokens, logits, rows, hn + r0 * h, h, 1.0f,
                          d_rows, d_rows, h, GemmOut::kF32, st, op + ": d head"));
  }
  return absl::OkStatus();
}

}  // namespace lumen::cuda
