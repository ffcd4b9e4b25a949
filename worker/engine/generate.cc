#include "worker/engine/generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "worker/engine/kernels.h"

namespace lumen::engine {
namespace {

// Runs positions [pos0, pos0 + n) through the model, appending to the caches; returns the
// logits of the last position.
class Decoder {
 public:
  Decoder(const ModelConfig& c, const ModelParams& p, int64_t max_len, ThreadPool* pool)
      : c_(c), p_(p), pool_(pool), max_len_(max_len) {
    const int64_t d = c.head_dim(), kd = c.num_key_value_heads * d;
    kcache_.assign(c.num_hidden_layers, std::vector<float>(max_len * kd));
    vcache_.assign(c.num_hidden_layers, std::vector<float>(max_len * kd));
    cos_.resize(max_len * d / 2);
    sin_.resize(max_len * d / 2);
    kernels::RopeTables<float>(max_len, d, c.rope_theta, cos_.data(), sin_.data());
  }

  std::vector<float> Forward(const int32_t* ids, int64_t n, int64_t pos0) {
    using namespace kernels;
    const int64_t h = c_.hidden_size, d = c_.head_dim(), I = c_.intermediate_size;
    const int64_t H = c_.num_attention_heads, KV = c_.num_key_value_heads, G = H / KV;
    const int64_t qd = H * d, kd = KV * d;
    std::vector<float> x(n * h), hb(n * h), rstd(n), q(n * qd), att(n * qd), g(n * I),
        u(n * I), m(n * I), scores(pos0 + n);
    EmbeddingForward(p_.embed_tokens.data(), ids, n, h, x.data(), pool_);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
      const LayerParams& lp = p_.layers[l];
      float* kc = kcache_[l].data();
      float* vc = vcache_[l].data();
      RmsNormForward(x.data(), lp.input_layernorm.data(), n, h, c_.rms_norm_eps, hb.data(),
                     rstd.data(), pool_);
      LinearForward(hb.data(), lp.q_proj.data(), n, h, qd, q.data());
      LinearForward(hb.data(), lp.k_proj.data(), n, h, kd, kc + pos0 * kd);
      LinearForward(hb.data(), lp.v_proj.data(), n, h, kd, vc + pos0 * kd);
      // seq_len = max_len_ so row r has position pos0 + r.
      Rope(q.data(), n, max_len_, H, d, pos0, cos_.data(), sin_.data(), false, pool_);
      Rope(kc + pos0 * kd, n, max_len_, KV, d, pos0, cos_.data(), sin_.data(), false, pool_);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t len = pos0 + i + 1;
        for (int64_t head = 0; head < H; ++head) {
          const float* qv = q.data() + i * qd + head * d;
          const int64_t kvh = head / G;
          float mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) {
            const float* kv = kc + j * kd + kvh * d;
            float s = 0;
            for (int64_t e = 0; e < d; ++e) s += qv[e] * kv[e];
            scores[j] = s * scale;
            mx = std::max(mx, scores[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j < len; ++j) {
            scores[j] = std::exp(scores[j] - mx);
            sum += scores[j];
          }
          float* o = att.data() + i * qd + head * d;
          std::fill(o, o + d, 0.0f);
          const float inv = static_cast<float>(1.0 / sum);
          for (int64_t j = 0; j < len; ++j) {
            const float w = scores[j] * inv;
            const float* vv = vc + j * kd + kvh * d;
            for (int64_t e = 0; e < d; ++e) o[e] += w * vv[e];
          }
        }
      }
      Gemm(false, true, n, h, qd, 1.0f, att.data(), qd, lp.o_proj.data(), qd, 1.0f, x.data(), h);
      RmsNormForward(x.data(), lp.post_attention_layernorm.data(), n, h, c_.rms_norm_eps,
                     hb.data(), rstd.data(), pool_);
      LinearForward(hb.data(), lp.gate_proj.data(), n, h, I, g.data());
      LinearForward(hb.data(), lp.up_proj.data(), n, h, I, u.data());
      SwiGluForward(g.data(), u.data(), n * I, m.data(), pool_);
      Gemm(false, true, n, h, I, 1.0f, m.data(), I, lp.down_proj.data(), I, 1.0f, x.data(), h);
    }
    const float* last = x.data() + (n - 1) * h;
    RmsNormForward(last, p_.norm.data(), 1, h, c_.rms_norm_eps, hb.data(), rstd.data(), nullptr);
    const float* head = c_.tie_word_embeddings ? p_.embed_tokens.data() : p_.lm_head.data();
    std::vector<float> logits(c_.vocab_size);
    LinearForward(hb.data(), head, 1, h, c_.vocab_size, logits.data());
    return logits;
  }

 private:
  const ModelConfig& c_;
  const ModelParams& p_;
  ThreadPool* pool_;
  const int64_t max_len_;
  std::vector<std::vector<float>> kcache_, vcache_;
  std::vector<float> cos_, sin_;
};

int32_t Sample(const std::vector<float>& logits, const GenerateOptions& o, std::mt19937_64* rng) {
  const int64_t v = static_cast<int64_t>(logits.size());
  if (o.temperature <= 0) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<int32_t> ids(v);
  std::iota(ids.begin(), ids.end(), 0);
  if (o.top_k > 0 && o.top_k < v) {
    std::partial_sort(ids.begin(), ids.begin() + o.top_k, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    ids.resize(o.top_k);
    std::sort(ids.begin(), ids.end());
  }
  double mx = -INFINITY;
  for (int32_t i : ids) mx = std::max(mx, static_cast<double>(logits[i]));
  std::vector<double> p(ids.size());
  double sum = 0;
  for (size_t k = 0; k < ids.size(); ++k) {
    p[k] = std::exp((logits[ids[k]] - mx) / o.temperature);
    sum += p[k];
  }
  const double u = static_cast<double>((*rng)() >> 11) * 0x1.0p-53 * sum;
  double acc = 0;
  for (size_t k = 0; k < ids.size(); ++k) {
    acc += p[k];
    if (u < acc) return ids[k];
  }
  return ids.back();
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> Generate(const ModelConfig& config, const ModelParams& params,
                                              const std::vector<int32_t>& prompt,
                                              const GenerateOptions& options, ThreadPool* pool) {
  if (prompt.empty()) return absl::InvalidArgumentError("generate: empty prompt");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("generate: prompt[", i, "] = ", prompt[i],
                                                     " outside [0, vocab_size ",
                                                     config.vocab_size, ")"));
    }
  }
  if (options.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: max_tokens ", options.max_tokens, " < 0"));
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  if (total > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "generate: prompt (", prompt.size(), ") + max_tokens (", options.max_tokens, ") = ",
        total, " exceeds max_position_embeddings ", config.max_position_embeddings));
  }
  std::vector<int32_t> out;
  if (options.max_tokens == 0) return out;
  Decoder dec(config, params, total, pool);
  std::mt19937_64 rng(options.seed);
  std::vector<float> logits =
      dec.Forward(prompt.data(), static_cast<int64_t>(prompt.size()), 0);
  int64_t pos = static_cast<int64_t>(prompt.size());
  while (true) {
    const int32_t next = Sample(logits, options, &rng);
    out.push_back(next);
    if (static_cast<int64_t>(out.size()) >= options.max_tokens || next == options.stop_token) break;
    logits = dec.Forward(&next, 1, pos);
    ++pos;
  }
  return out;
}

}  // namespace lumen::engine
