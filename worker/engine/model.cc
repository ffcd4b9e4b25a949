#include "worker/engine/model.h"

#include <cblas.h>

#include <cstring>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "worker/engine/kernels.h"

namespace lumen::engine {

absl::Status CheckModelConfig(const ModelConfig& c) {
  auto positive = [](const char* name, int64_t v) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", v));
    return absl::OkStatus();
  };
  for (auto [name, v] : {std::pair<const char*, int64_t>{"hidden_size", c.hidden_size},
                         {"intermediate_size", c.intermediate_size},
                         {"num_hidden_layers", c.num_hidden_layers},
                         {"num_attention_heads", c.num_attention_heads},
                         {"num_key_value_heads", c.num_key_value_heads},
                         {"vocab_size", c.vocab_size},
                         {"max_position_embeddings", c.max_position_embeddings}}) {
    absl::Status s = positive(name, v);
    if (!s.ok()) return s;
  }
  if (c.hidden_size % c.num_attention_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden_size ", c.hidden_size, " is not a multiple of num_attention_heads ",
                     c.num_attention_heads));
  }
  if (c.head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", c.head_dim(), " (hidden_size / num_attention_heads) must be even"));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_key_value_heads ", c.num_key_value_heads,
                     " does not divide num_attention_heads ", c.num_attention_heads));
  }
  if (c.vocab_size > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", c.vocab_size, " too large"));
  }
  if (!(c.rms_norm_eps > 0) || !(c.rope_theta > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("rms_norm_eps ", c.rms_norm_eps,
                                                   " and rope_theta ", c.rope_theta,
                                                   " must be > 0"));
  }
  return absl::OkStatus();
}

int64_t ParameterCount(const ModelConfig& c) {
  const int64_t h = c.hidden_size, d = c.head_dim();
  const int64_t per_layer = 2 * h + h * c.num_attention_heads * d * 2 +
                            h * c.num_key_value_heads * d * 2 + 3 * h * c.intermediate_size;
  return c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) + c.num_hidden_layers * per_layer +
         h;
}

template <typename T>
std::vector<NamedTensor<T>> NamedTensors(const ModelConfig& c, ModelParamsT<T>* p) {
  const int64_t h = c.hidden_size, d = c.head_dim(), i = c.intermediate_size;
  const int64_t qd = c.num_attention_heads * d, kd = c.num_key_value_heads * d;
  std::vector<NamedTensor<T>> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}, &p->embed_tokens});
  for (size_t l = 0; l < p->layers.size(); ++l) {
    LayerParamsT<T>& lp = p->layers[l];
    const std::string pre = absl::StrCat("model.layers.", l, ".");
    out.push_back({pre + "self_attn.q_proj.weight", {qd, h}, &lp.q_proj});
    out.push_back({pre + "self_attn.k_proj.weight", {kd, h}, &lp.k_proj});
    out.push_back({pre + "self_attn.v_proj.weight", {kd, h}, &lp.v_proj});
    out.push_back({pre + "self_attn.o_proj.weight", {h, qd}, &lp.o_proj});
    out.push_back({pre + "mlp.gate_proj.weight", {i, h}, &lp.gate_proj});
    out.push_back({pre + "mlp.up_proj.weight", {i, h}, &lp.up_proj});
    out.push_back({pre + "mlp.down_proj.weight", {h, i}, &lp.down_proj});
    out.push_back({pre + "input_layernorm.weight", {h}, &lp.input_layernorm});
    out.push_back({pre + "post_attention_layernorm.weight", {h}, &lp.post_attention_layernorm});
  }
  out.push_back({"model.norm.weight", {h}, &p->norm});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}, &p->lm_head});
  return out;
}

template <typename T>
ModelParamsT<T> AllocateParams(const ModelConfig& c) {
  ModelParamsT<T> p;
  p.layers.resize(c.num_hidden_layers);
  for (NamedTensor<T>& t : NamedTensors(c, &p)) {
    int64_t n = 1;
    for (int64_t s : t.shape) n *= s;
    t.data->assign(n, T(0));
  }
  return p;
}

// Activations of one layer that the backward needs.
template <typename T>
struct LayerActs {
  std::vector<T> h1, rstd1, q, k, v, probs, att, x2, h2, rstd2, g, u, m;
};

namespace {

// Element counts of one micro-batch's scratch; EnsureBuffers, EnsureLayerScratch and
// EnsureHeadScratch allocate exactly these.
struct ScratchShape {
  int64_t n, h, d, I, qd, kd, pp, vocab;
  ScratchShape(const ModelConfig& c, int64_t batch, int64_t seq)
      : n(batch * seq),
        h(c.hidden_size),
        d(c.head_dim()),
        I(c.intermediate_size),
        qd(c.num_attention_heads * c.head_dim()),
        kd(c.num_key_value_heads * c.head_dim()),
        pp(batch * c.num_attention_heads * seq * seq),
        vocab(c.vocab_size) {}
};

template <typename T>
void ResizeLayerActs(const ScratchShape& s, LayerActs<T>* a) {
  a->h1.resize(s.n * s.h);
  a->rstd1.resize(s.n);
  a->q.resize(s.n * s.qd);
  a->k.resize(s.n * s.kd);
  a->v.resize(s.n * s.kd);
  a->probs.resize(s.pp);
  a->att.resize(s.n * s.qd);
  a->x2.resize(s.n * s.h);
  a->h2.resize(s.n * s.h);
  a->rstd2.resize(s.n);
  a->g.resize(s.n * s.I);
  a->u.resize(s.n * s.I);
  a->m.resize(s.n * s.I);
}

}  // namespace

template <typename T>
struct LlamaModelT<T>::Buffers {
  int64_t batch = 0, seq = 0;
  std::vector<std::vector<T>> xs;  // residual stream at the input of each layer, and final
  std::vector<LayerActs<T>> acts;  // one per layer, or one shared when checkpointing
  std::vector<T> hn, rstdn, logits;
  std::vector<double> losses;
  std::vector<T> rope_cos, rope_sin;
  // Backward scratch.
  std::vector<T> dxa, dxb, dh, dq, dk, dv, datt, dprobs, dm, dg, du, recompute_out;
};

template <typename T>
LlamaModelT<T>::LlamaModelT(const ModelConfig& config, bool activation_checkpointing,
                            ThreadPool* pool)
    : config_(config),
      checkpointing_(activation_checkpointing),
      pool_(pool),
      params_(AllocateParams<T>(config)),
      grads_(AllocateParams<T>(config)),
      buf_(std::make_unique<Buffers>()) {
  // The kernels split matrix products over the pool themselves; a multi-threaded OpenBLAS
  // inside those chunks would oversubscribe the cores (its idle threads spin-yield).
  if (pool_ != nullptr && pool_->num_threads() > 1) openblas_set_num_threads(1);
}

template <typename T>
LlamaModelT<T>::~LlamaModelT() = default;

template <typename T>
void LlamaModelT<T>::ZeroGrads() {
  for (NamedTensor<T>& t : NamedTensors(config_, &grads_)) {
    std::fill(t.data->begin(), t.data->end(), T(0));
  }
}

template <typename T>
absl::Status LlamaModelT<T>::CheckIds(const int32_t* ids, int64_t n, const char* what) const {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i, "] = ", ids[i],
                                                     " is outside [0, vocab_size ",
                                                     config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

template <typename T>
void LlamaModelT<T>::EnsureBuffers(int64_t batch, int64_t seq) {
  Buffers& b = *buf_;
  if (b.batch == batch && b.seq == seq) return;
  const ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, d = c.head_dim(), I = c.intermediate_size;
  const int64_t qd = c.num_attention_heads * d, kd = c.num_key_value_heads * d;
  const int64_t pp = batch * c.num_attention_heads * seq * seq;
  b.batch = batch;
  b.seq = seq;
  b.xs.assign(c.num_hidden_layers + 1, std::vector<T>(n * h));
  b.acts.clear();
  b.acts.resize(checkpointing_ ? 1 : c.num_hidden_layers);
  const ScratchShape shape(c, batch, seq);
  for (LayerActs<T>& a : b.acts) ResizeLayerActs(shape, &a);
  b.hn.resize(n * h);
  b.rstdn.resize(n);
  b.logits.resize(n * c.vocab_size);
  b.losses.resize(n);
  b.rope_cos.resize(seq * d / 2);
  b.rope_sin.resize(seq * d / 2);
  kernels::RopeTables<T>(seq, d, c.rope_theta, b.rope_cos.data(), b.rope_sin.data());
  b.dxa.resize(n * h);
  b.dxb.resize(n * h);
  b.dh.resize(n * h);
  b.dq.resize(n * qd);
  b.dk.resize(n * kd);
  b.dv.resize(n * kd);
  b.datt.resize(n * qd);
  b.dprobs.resize(pp);
  b.dm.resize(n * I);
  b.dg.resize(n * I);
  b.du.resize(n * I);
  b.recompute_out.resize(checkpointing_ ? n * h : 0);
}

template <typename T>
void LlamaModelT<T>::LayerForward(Buffers& b, int layer, const T* x, T* out, int64_t batch,
                                  int64_t seq, int acts_index) {
  using namespace kernels;
  const ModelConfig& c = config_;
  const LayerParamsT<T>& p = params_.layers[layer];
  LayerActs<T>& a = b.acts[acts_index];
  const int64_t n = batch * seq, h = c.hidden_size, d = c.head_dim(), I = c.intermediate_size;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads;
  const double eps = c.rms_norm_eps;
  RmsNormForward(x, p.input_layernorm.data(), n, h, eps, a.h1.data(), a.rstd1.data(), pool_);
  LinearForward(a.h1.data(), p.q_proj.data(), n, h, H * d, a.q.data(), pool_);
  LinearForward(a.h1.data(), p.k_proj.data(), n, h, KV * d, a.k.data(), pool_);
  LinearForward(a.h1.data(), p.v_proj.data(), n, h, KV * d, a.v.data(), pool_);
  Rope(a.q.data(), n, seq, H, d, 0, b.rope_cos.data(), b.rope_sin.data(), false, pool_);
  Rope(a.k.data(), n, seq, KV, d, 0, b.rope_cos.data(), b.rope_sin.data(), false, pool_);
  AttentionForward(a.q.data(), a.k.data(), a.v.data(), batch, seq, H, KV, d, a.probs.data(),
                   a.att.data(), pool_);
  // x2 = x + att W_o^T
  std::memcpy(a.x2.data(), x, sizeof(T) * n * h);
  ParallelGemm(pool_, false, true, n, h, H * d, T(1), a.att.data(), H * d, p.o_proj.data(),
               H * d, T(1), a.x2.data(), h);
  RmsNormForward(a.x2.data(), p.post_attention_layernorm.data(), n, h, eps, a.h2.data(),
                 a.rstd2.data(), pool_);
  LinearForward(a.h2.data(), p.gate_proj.data(), n, h, I, a.g.data(), pool_);
  LinearForward(a.h2.data(), p.up_proj.data(), n, h, I, a.u.data(), pool_);
  SwiGluForward(a.g.data(), a.u.data(), n * I, a.m.data(), pool_);
  std::memcpy(out, a.x2.data(), sizeof(T) * n * h);
  ParallelGemm(pool_, false, true, n, h, I, T(1), a.m.data(), I, p.down_proj.data(), I, T(1),
               out, h);
}

template <typename T>
void LlamaModelT<T>::LayerBackward(Buffers& b, int layer, const T* x, T* dy, T* dx,
                                   int64_t batch, int64_t seq, int acts_index) {
  using namespace kernels;
  const ModelConfig& c = config_;
  const LayerParamsT<T>& p = params_.layers[layer];
  LayerParamsT<T>& gp = grads_.layers[layer];
  LayerActs<T>& a = b.acts[acts_index];
  const int64_t n = batch * seq, h = c.hidden_size, d = c.head_dim(), I = c.intermediate_size;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads;
  // dy is the gradient w.r.t. the layer output; it also flows through the MLP residual, so it
  // becomes dx2 in place.
  // MLP: out = x2 + down(m)
  LinearBackward(dy, a.m.data(), p.down_proj.data(), n, I, h, b.dm.data(), false,
                 gp.down_proj.data(), pool_);
  SwiGluBackward(b.dm.data(), a.g.data(), a.u.data(), n * I, b.dg.data(), b.du.data(), pool_);
  LinearBackward(b.dg.data(), a.h2.data(), p.gate_proj.data(), n, h, I, b.dh.data(), false,
                 gp.gate_proj.data(), pool_);
  LinearBackward(b.du.data(), a.h2.data(), p.up_proj.data(), n, h, I, b.dh.data(), true,
                 gp.up_proj.data(), pool_);
  RmsNormBackward(b.dh.data(), a.x2.data(), p.post_attention_layernorm.data(), a.rstd2.data(),
                  n, h, dy, true, gp.post_attention_layernorm.data(), pool_);
  T* dx2 = dy;
  // Attention: x2 = x + o(att)
  LinearBackward(dx2, a.att.data(), p.o_proj.data(), n, H * d, h, b.datt.data(), false,
                 gp.o_proj.data(), pool_);
  AttentionBackward(b.datt.data(), a.q.data(), a.k.data(), a.v.data(), a.probs.data(), batch,
                    seq, H, KV, d, b.dprobs.data(), b.dq.data(), b.dk.data(), b.dv.data(), pool_);
  Rope(b.dq.data(), n, seq, H, d, 0, b.rope_cos.data(), b.rope_sin.data(), true, pool_);
  Rope(b.dk.data(), n, seq, KV, d, 0, b.rope_cos.data(), b.rope_sin.data(), true, pool_);
  LinearBackward(b.dq.data(), a.h1.data(), p.q_proj.data(), n, h, H * d, b.dh.data(), false,
                 gp.q_proj.data(), pool_);
  LinearBackward(b.dk.data(), a.h1.data(), p.k_proj.data(), n, h, KV * d, b.dh.data(), true,
                 gp.k_proj.data(), pool_);
  LinearBackward(b.dv.data(), a.h1.data(), p.v_proj.data(), n, h, KV * d, b.dh.data(), true,
                 gp.v_proj.data(), pool_);
  std::memcpy(dx, dx2, sizeof(T) * n * h);
  RmsNormBackward(b.dh.data(), x, p.input_layernorm.data(), a.rstd1.data(), n, h, dx, true,
                  gp.input_layernorm.data(), pool_);
}

template <typename T>
void LlamaModelT<T>::RunForward(const int32_t* inputs, int64_t batch, int64_t seq) {
  using namespace kernels;
  EnsureBuffers(batch, seq);
  Buffers& b = *buf_;
  const ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size;
  EmbeddingForward(params_.embed_tokens.data(), inputs, n, h, b.xs[0].data(), pool_);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerForward(b, l, b.xs[l].data(), b.xs[l + 1].data(), batch, seq, checkpointing_ ? 0 : l);
  }
  RmsNormForward(b.xs[c.num_hidden_layers].data(), params_.norm.data(), n, h, c.rms_norm_eps,
                 b.hn.data(), b.rstdn.data(), pool_);
  const T* head = c.tie_word_embeddings ? params_.embed_tokens.data() : params_.lm_head.data();
  LinearForward(b.hn.data(), head, n, h, c.vocab_size, b.logits.data(), pool_);
}

template <typename T>
absl::StatusOr<double> LlamaModelT<T>::Forward(const int32_t* inputs, const int32_t* targets,
                                               int64_t batch, int64_t seq) {
  if (seq > config_.max_position_embeddings || seq <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " x seq ", seq,
                                                   " invalid (max_position_embeddings ",
                                                   config_.max_position_embeddings, ")"));
  }
  const int64_t n = batch * seq;
  if (absl::Status s = CheckIds(inputs, n, "inputs"); !s.ok()) return s;
  if (absl::Status s = CheckIds(targets, n, "targets"); !s.ok()) return s;
  RunForward(inputs, batch, seq);
  kernels::CrossEntropy(buf_->logits.data(), targets, n, config_.vocab_size, T(0),
                        buf_->losses.data(), pool_);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += buf_->losses[i];
  return sum / n;
}

template <typename T>
absl::Status LlamaModelT<T>::Logits(const int32_t* inputs, int64_t batch, int64_t seq,
                                    std::vector<T>* logits) {
  if (seq > config_.max_position_embeddings || seq <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " x seq ", seq,
                                                   " invalid (max_position_embeddings ",
                                                   config_.max_position_embeddings, ")"));
  }
  if (absl::Status s = CheckIds(inputs, batch * seq, "inputs"); !s.ok()) return s;
  RunForward(inputs, batch, seq);
  *logits = buf_->logits;
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<double> LlamaModelT<T>::ForwardBackward(const int32_t* inputs,
                                                       const int32_t* targets, int64_t batch,
                                                       int64_t seq, T grad_scale) {
  using namespace kernels;
  if (seq > config_.max_position_embeddings || seq <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " x seq ", seq,
                                                   " invalid (max_position_embeddings ",
                                                   config_.max_position_embeddings, ")"));
  }
  const ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, L = c.num_hidden_layers;
  if (absl::Status s = CheckIds(inputs, n, "inputs"); !s.ok()) return s;
  if (absl::Status s = CheckIds(targets, n, "targets"); !s.ok()) return s;
  RunForward(inputs, batch, seq);
  Buffers& b = *buf_;
  CrossEntropy(b.logits.data(), targets, n, c.vocab_size,
               static_cast<T>(grad_scale / static_cast<T>(n)), b.losses.data(), pool_);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += b.losses[i];

  // LM head and final norm.
  const T* head = c.tie_word_embeddings ? params_.embed_tokens.data() : params_.lm_head.data();
  T* dhead = c.tie_word_embeddings ? grads_.embed_tokens.data() : grads_.lm_head.data();
  LinearBackward(b.logits.data(), b.hn.data(), head, n, h, c.vocab_size, b.dh.data(), false,
                 dhead, pool_);
  T* dy = b.dxa.data();
  T* dx = b.dxb.data();
  RmsNormBackward(b.dh.data(), b.xs[L].data(), params_.norm.data(), b.rstdn.data(), n, h, dy,
                  false, grads_.norm.data(), pool_);
  for (int64_t l = L - 1; l >= 0; --l) {
    int acts_index = static_cast<int>(l);
    if (checkpointing_) {
      acts_index = 0;
      LayerForward(b, static_cast<int>(l), b.xs[l].data(), b.recompute_out.data(), batch, seq,
                   0);
    }
    LayerBackward(b, static_cast<int>(l), b.xs[l].data(), dy, dx, batch, seq, acts_index);
    std::swap(dy, dx);
  }
  EmbeddingBackward(dy, inputs, n, h, grads_.embed_tokens.data(), pool_);
  return sum / n;
}

// ---- Layer-wise execution ----

template <typename T>
LlamaModelT<T>::LlamaModelT(const ModelConfig& config, ThreadPool* pool, UnallocatedTag)
    : config_(config), checkpointing_(true), pool_(pool), buf_(std::make_unique<Buffers>()) {
  params_.layers.resize(config.num_hidden_layers);
  grads_.layers.resize(config.num_hidden_layers);
  if (pool_ != nullptr && pool_->num_threads() > 1) openblas_set_num_threads(1);
}

template <typename T>
std::unique_ptr<LlamaModelT<T>> LlamaModelT<T>::CreateUnallocated(const ModelConfig& config,
                                                                  ThreadPool* pool) {
  return std::unique_ptr<LlamaModelT<T>>(new LlamaModelT<T>(config, pool, UnallocatedTag{}));
}

template <typename T>
int64_t LlamaModelT<T>::LayerScratchBytes(int64_t batch, int64_t seq) const {
  const ScratchShape s(config_, batch, seq);
  // Activations of one layer (h1 rstd1 q k v probs att x2 h2 rstd2 g u m),
  // backward scratch (dh dq dk dv datt dprobs dm dg du recompute_out) and the
  // RoPE tables.
  const int64_t acts =
      3 * s.n * s.h + 2 * s.n + 2 * s.n * s.qd + 2 * s.n * s.kd + s.pp + 3 * s.n * s.I;
  const int64_t back = 2 * s.n * s.h + 2 * s.n * s.qd + 2 * s.n * s.kd + s.pp + 3 * s.n * s.I;
  return static_cast<int64_t>(sizeof(T)) * (acts + back + seq * s.d);
}

template <typename T>
int64_t LlamaModelT<T>::HeadScratchBytes(int64_t batch, int64_t seq) const {
  const ScratchShape s(config_, batch, seq);
  // hn, rstdn, logits, the head's input gradient (dxa) and the per-token losses
  // (double).
  return static_cast<int64_t>(sizeof(T)) * (2 * s.n * s.h + s.n + s.n * s.vocab) +
         static_cast<int64_t>(sizeof(double)) * s.n;
}

template <typename T>
void LlamaModelT<T>::EnsureLayerScratch(int64_t batch, int64_t seq) {
  if (layer_buf_ != nullptr && layer_buf_->batch == batch && layer_buf_->seq == seq) return;
  const ScratchShape s(config_, batch, seq);
  layer_buf_ = std::make_unique<Buffers>();
  Buffers& b = *layer_buf_;
  b.batch = batch;
  b.seq = seq;
  b.acts.resize(1);
  ResizeLayerActs(s, &b.acts[0]);
  b.rope_cos.resize(seq * s.d / 2);
  b.rope_sin.resize(seq * s.d / 2);
  kernels::RopeTables<T>(seq, s.d, config_.rope_theta, b.rope_cos.data(), b.rope_sin.data());
  b.dh.resize(s.n * s.h);
  b.dq.resize(s.n * s.qd);
  b.dk.resize(s.n * s.kd);
  b.dv.resize(s.n * s.kd);
  b.datt.resize(s.n * s.qd);
  b.dprobs.resize(s.pp);
  b.dm.resize(s.n * s.I);
  b.dg.resize(s.n * s.I);
  b.du.resize(s.n * s.I);
  b.recompute_out.resize(s.n * s.h);
}

template <typename T>
void LlamaModelT<T>::EnsureHeadScratch(int64_t batch, int64_t seq) {
  if (head_buf_ != nullptr && head_buf_->batch == batch && head_buf_->seq == seq) return;
  const ScratchShape s(config_, batch, seq);
  head_buf_ = std::make_unique<Buffers>();
  Buffers& b = *head_buf_;
  b.batch = batch;
  b.seq = seq;
  b.hn.resize(s.n * s.h);
  b.rstdn.resize(s.n);
  b.logits.resize(s.n * s.vocab);
  b.dxa.resize(s.n * s.h);
  b.losses.resize(s.n);
}

template <typename T>
void LlamaModelT<T>::ReleaseLayerScratch() {
  layer_buf_.reset();
}

template <typename T>
void LlamaModelT<T>::ReleaseHeadScratch() {
  head_buf_.reset();
}

template <typename T>
absl::Status LlamaModelT<T>::CheckShape(int64_t batch, int64_t seq) const {
  if (seq > config_.max_position_embeddings || seq <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " x seq ", seq,
                                                   " invalid (max_position_embeddings ",
                                                   config_.max_position_embeddings, ")"));
  }
  return absl::OkStatus();
}

namespace {

template <typename T>
absl::Status CheckLoaded(const std::vector<T>& v, int64_t want, const std::string& what) {
  if (static_cast<int64_t>(v.size()) != want) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " holds ", v.size(), " of ", want, " elements (not loaded)"));
  }
  return absl::OkStatus();
}

}  // namespace

template <typename T>
absl::Status LlamaModelT<T>::CheckLayerLoaded(int layer, bool with_grads) const {
  if (layer < 0 || layer >= config_.num_hidden_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " outside [0, ", config_.num_hidden_layers, ")"));
  }
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, I = c.intermediate_size;
  const int64_t qd = c.num_attention_heads * c.head_dim(),
                kd = c.num_key_value_heads * c.head_dim();
  for (int g = 0; g < (with_grads ? 2 : 1); ++g) {
    const LayerParamsT<T>& p = g == 0 ? params_.layers[layer] : grads_.layers[layer];
    const std::string pre = absl::StrCat(g == 0 ? "params" : "grads", " of layer ", layer, ": ");
    for (auto [v, want, name] : {std::tuple<const std::vector<T>*, int64_t, const char*>{
                                     &p.input_layernorm, h, "input_layernorm"},
                                 {&p.q_proj, qd * h, "q_proj"},
                                 {&p.k_proj, kd * h, "k_proj"},
                                 {&p.v_proj, kd * h, "v_proj"},
                                 {&p.o_proj, h * qd, "o_proj"},
                                 {&p.post_attention_layernorm, h, "post_attention_layernorm"},
                                 {&p.gate_proj, I * h, "gate_proj"},
                                 {&p.up_proj, I * h, "up_proj"},
                                 {&p.down_proj, h * I, "down_proj"}}) {
      if (absl::Status s = CheckLoaded(*v, want, pre + name); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status LlamaModelT<T>::EmbedForward(const int32_t* inputs, int64_t batch, int64_t seq, T* x) {
  if (absl::Status s = CheckShape(batch, seq); !s.ok()) return s;
  const int64_t n = batch * seq, h = config_.hidden_size;
  if (absl::Status s = CheckIds(inputs, n, "inputs"); !s.ok()) return s;
  if (absl::Status s =
          CheckLoaded(params_.embed_tokens, config_.vocab_size * h, "params: embed_tokens");
      !s.ok()) {
    return s;
  }
  kernels::EmbeddingForward(params_.embed_tokens.data(), inputs, n, h, x, pool_);
  return absl::OkStatus();
}

template <typename T>
absl::Status LlamaModelT<T>::EmbedBackward(const int32_t* inputs, int64_t batch, int64_t seq,
                                           const T* dx) {
  if (absl::Status s = CheckShape(batch, seq); !s.ok()) return s;
  const int64_t n = batch * seq, h = config_.hidden_size;
  if (absl::Status s = CheckIds(inputs, n, "inputs"); !s.ok()) return s;
  if (absl::Status s =
          CheckLoaded(grads_.embed_tokens, config_.vocab_size * h, "grads: embed_tokens");
      !s.ok()) {
    return s;
  }
  kernels::EmbeddingBackward(dx, inputs, n, h, grads_.embed_tokens.data(), pool_);
  return absl::OkStatus();
}

template <typename T>
absl::Status LlamaModelT<T>::DecoderLayerForward(int layer, const T* x, T* out, int64_t batch,
                                                 int64_t seq) {
  if (absl::Status s = CheckShape(batch, seq); !s.ok()) return s;
  if (absl::Status s = CheckLayerLoaded(layer, false); !s.ok()) return s;
  EnsureLayerScratch(batch, seq);
  LayerForward(*layer_buf_, layer, x, out, batch, seq, 0);
  return absl::OkStatus();
}

template <typename T>
absl::Status LlamaModelT<T>::DecoderLayerBackward(int layer, const T* x, T* dy, T* dx,
                                                  int64_t batch, int64_t seq) {
  if (absl::Status s = CheckShape(batch, seq); !s.ok()) return s;
  if (absl::Status s = CheckLayerLoaded(layer, true); !s.ok()) return s;
  EnsureLayerScratch(batch, seq);
  Buffers& b = *layer_buf_;
  // The checkpointed path of ForwardBackward: recompute, then backward.
  LayerForward(b, layer, x, b.recompute_out.data(), batch, seq, 0);
  LayerBackward(b, layer, x, dy, dx, batch, seq, 0);
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<double> LlamaModelT<T>::HeadForwardBackward(const T* x, const int32_t* targets,
                                                           int64_t batch, int64_t seq, T grad_scale,
                                                           T* dx) {
  using namespace kernels;
  if (absl::Status s = CheckShape(batch, seq); !s.ok()) return s;
  const ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size;
  if (absl::Status s = CheckIds(targets, n, "targets"); !s.ok()) return s;
  const bool tied = c.tie_word_embeddings;
  for (auto [v, want, what] :
       {std::tuple<const std::vector<T>*, int64_t, const char*>{&params_.norm, h, "params: norm"},
        {&grads_.norm, h, "grads: norm"},
        {tied ? &params_.embed_tokens : &params_.lm_head, c.vocab_size * h,
         tied ? "params: embed_tokens" : "params: lm_head"},
        {tied ? &grads_.embed_tokens : &grads_.lm_head, c.vocab_size * h,
         tied ? "grads: embed_tokens" : "grads: lm_head"}}) {
    if (absl::Status s = CheckLoaded(*v, want, what); !s.ok()) return s;
  }
  EnsureHeadScratch(batch, seq);
  Buffers& b = *head_buf_;
  // As ForwardBackward, operation for operation.
  RmsNormForward(x, params_.norm.data(), n, h, c.rms_norm_eps, b.hn.data(), b.rstdn.data(), pool_);
  const T* head = tied ? params_.embed_tokens.data() : params_.lm_head.data();
  LinearForward(b.hn.data(), head, n, h, c.vocab_size, b.logits.data(), pool_);
  CrossEntropy(b.logits.data(), targets, n, c.vocab_size,
               static_cast<T>(grad_scale / static_cast<T>(n)), b.losses.data(), pool_);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += b.losses[i];
  T* dhead = tied ? grads_.embed_tokens.data() : grads_.lm_head.data();
  LinearBackward(b.logits.data(), b.hn.data(), head, n, h, c.vocab_size, b.dxa.data(), false, dhead,
                 pool_);
  RmsNormBackward(b.dxa.data(), x, params_.norm.data(), b.rstdn.data(), n, h, dx, false,
                  grads_.norm.data(), pool_);
  return sum / n;
}

template std::vector<NamedTensor<float>> NamedTensors(const ModelConfig&, ModelParamsT<float>*);
template std::vector<NamedTensor<double>> NamedTensors(const ModelConfig&,
                                                       ModelParamsT<double>*);
template ModelParamsT<float> AllocateParams<float>(const ModelConfig&);
template ModelParamsT<double> AllocateParams<double>(const ModelConfig&);
template class LlamaModelT<float>;
template class LlamaModelT<double>;

}  // namespace lumen::engine
