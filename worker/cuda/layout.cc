#include "worker/cuda/layout.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lumen::cuda {
namespace {

int64_t Align128(int64_t n) { return (n + 127) / 128 * 128; }

struct HostSegment {
  GroupSegment seg;
  std::vector<float>* host;
};

// Groups in ResidentState order, each with its tensors' offsets and the host tensors of `p`.
std::vector<std::vector<HostSegment>> GroupTensors(const engine::ModelConfig& c,
                                                   engine::ModelParams* p) {
  const LayerLayout L = LayerLayout::For(c);
  const int64_t h = c.hidden_size, I = c.intermediate_size, qd = L.q_dim, kd = L.kv_dim;
  std::vector<std::vector<HostSegment>> groups;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    engine::LayerParams& lp = p->layers[l];
    groups.push_back({{{L.input_layernorm, h, false}, &lp.input_layernorm},
                      {{L.qkv, qd * h, true}, &lp.q_proj},
                      {{L.qkv + qd * h, kd * h, true}, &lp.k_proj},
                      {{L.qkv + (qd + kd) * h, kd * h, true}, &lp.v_proj},
                      {{L.o_proj, h * qd, true}, &lp.o_proj},
                      {{L.post_attention_layernorm, h, false}, &lp.post_attention_layernorm},
                      {{L.gate_up, I * h, true}, &lp.gate_proj},
                      {{L.gate_up + I * h, I * h, true}, &lp.up_proj},
                      {{L.down_proj, h * I, true}, &lp.down_proj}});
  }
  groups.push_back({{{0, c.vocab_size * h, true}, &p->embed_tokens}});
  groups.push_back({{{0, h, false}, &p->norm}});
  if (!c.tie_word_embeddings) groups.push_back({{{0, c.vocab_size * h, true}, &p->lm_head}});
  return groups;
}

int64_t GroupElems(const engine::ModelConfig& c, size_t g) {
  const int64_t L = c.num_hidden_layers;
  if (static_cast<int64_t>(g) < L) return LayerLayout::For(c).total;
  if (static_cast<int64_t>(g) == L) return c.vocab_size * c.hidden_size;
  if (static_cast<int64_t>(g) == L + 1) return c.hidden_size;
  return c.vocab_size * c.hidden_size;
}

}  // namespace

LayerLayout LayerLayout::For(const engine::ModelConfig& c) {
  LayerLayout l;
  const int64_t h = c.hidden_size, I = c.intermediate_size;
  l.q_dim = c.num_attention_heads * c.head_dim();
  l.kv_dim = c.num_key_value_heads * c.head_dim();
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += Align128(n);
    return at;
  };
  l.input_layernorm = take(h);
  l.qkv = take((l.q_dim + 2 * l.kv_dim) * h);
  l.o_proj = take(h * l.q_dim);
  l.post_attention_layernorm = take(h);
  l.gate_up = take(2 * I * h);
  l.down_proj = take(h * I);
  l.total = off;
  return l;
}

std::vector<TensorGroupShape> TensorGroupShapes(const engine::ModelConfig& config) {
  engine::ModelParams empty;
  empty.layers.resize(config.num_hidden_layers);
  const auto host = GroupTensors(config, &empty);
  std::vector<TensorGroupShape> out(host.size());
  for (size_t g = 0; g < host.size(); ++g) {
    out[g].elems = GroupElems(config, g);
    for (const HostSegment& hs : host[g]) out[g].segments.push_back(hs.seg);
  }
  return out;
}

std::map<std::string, size_t> TensorGroupOf(const engine::ModelConfig& config) {
  engine::ModelParams empty;
  empty.layers.resize(config.num_hidden_layers);
  std::map<const std::vector<float>*, size_t> group_of;
  const auto host = GroupTensors(config, &empty);
  for (size_t g = 0; g < host.size(); ++g) {
    for (const HostSegment& hs : host[g]) group_of[hs.host] = g;
  }
  std::map<std::string, size_t> out;
  for (const engine::NamedTensor<float>& t : engine::NamedTensors(config, &empty)) {
    out[t.name] = group_of.at(t.data);
  }
  return out;
}

absl::Status CopyGroupRange(const engine::ModelConfig& config, engine::ModelParams* params,
                            size_t g, int64_t lo, int64_t hi, float* flat, bool to_flat) {
  if (params->layers.size() != static_cast<size_t>(config.num_hidden_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("parameters of ", params->layers.size(),
                                                   " layers for a model of ",
                                                   config.num_hidden_layers));
  }
  const auto host = GroupTensors(config, params);
  if (g >= host.size()) return absl::InvalidArgumentError(absl::StrCat("no tensor group ", g));
  for (const HostSegment& hs : host[g]) {
    if (static_cast<int64_t>(hs.host->size()) != hs.seg.size) {
      if (to_flat) {
        return absl::InvalidArgumentError(absl::StrCat("tensor group ", g, ": a tensor of ",
                                                       hs.host->size(), " values where ",
                                                       hs.seg.size, " belong"));
      }
      hs.host->resize(hs.seg.size);
    }
    const int64_t b = std::max(lo, hs.seg.offset);
    const int64_t e = std::min(hi, hs.seg.offset + hs.seg.size);
    if (b >= e) continue;
    float* tensor = hs.host->data() + (b - hs.seg.offset);
    if (to_flat) {
      std::memcpy(flat + (b - lo), tensor, 4 * (e - b));
    } else {
      std::memcpy(tensor, flat + (b - lo), 4 * (e - b));
    }
  }
  return absl::OkStatus();
}

absl::Status CopyGroupTensors(const engine::ModelConfig& config, engine::ModelParams* params,
                              size_t g, float* flat, bool to_flat) {
  const int64_t elems = GroupElems(config, g);
  return CopyGroupRange(config, params, g, 0, elems, flat, to_flat);
}

}  // namespace lumen::cuda
