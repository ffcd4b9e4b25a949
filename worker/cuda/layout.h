// Where a model's tensors sit in the CUDA device's flat tensor groups (decoder layers, the
// embedding, the final norm, the untied LM head): offsets and sizes only, no CUDA, so host-side
// code and CPU tests can use them.
#ifndef LUMEN_WORKER_CUDA_LAYOUT_H_
#define LUMEN_WORKER_CUDA_LAYOUT_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/model.h"

namespace lumen::cuda {

// Element offsets of one decoder layer's tensors in its contiguous buffer; every tensor starts
// at a multiple of 128 elements (256 bytes in bf16). The same layout holds the bf16
// parameters, fp32 gradients, master weights and AdamW moments. q, k, v rows are adjacent (one
// fused [q_dim + 2 kv_dim, hidden] product), as are gate and up ([2 intermediate, hidden]).
struct LayerLayout {
  int64_t input_layernorm = 0, qkv = 0, o_proj = 0, post_attention_layernorm = 0, gate_up = 0,
          down_proj = 0, total = 0;
  int64_t q_dim = 0, kv_dim = 0;

  static LayerLayout For(const engine::ModelConfig& config);
};

// One tensor inside a group: (offset, size) in elements, and whether it is a matrix (weight
// decay applies).
struct GroupSegment {
  int64_t offset, size;
  bool matrix;
};

// A tensor group's elements and its tensors.
struct TensorGroupShape {
  int64_t elems = 0;
  std::vector<GroupSegment> segments;
};

// The tensor groups of a model: decoder layers 0..L-1, embed_tokens, norm, then lm_head when
// untied. Layers use LayerLayout; the others are one tensor each.
std::vector<TensorGroupShape> TensorGroupShapes(const engine::ModelConfig& config);

// The group of each tensor, by Hugging Face name.
std::map<std::string, size_t> TensorGroupOf(const engine::ModelConfig& config);

// Copies group g's tensors of `params` into `flat` (its TensorGroupShapes layout) when
// `to_flat`, or `flat` into them (resized when they are not the config's sizes) otherwise.
// INVALID_ARGUMENT for params of another shape.
absl::Status CopyGroupTensors(const engine::ModelConfig& config, engine::ModelParams* params,
                              size_t g, float* flat, bool to_flat);
// The same for the elements [lo, hi) of the group only, `flat` holding element lo (padding
// between tensors is not touched).
absl::Status CopyGroupRange(const engine::ModelConfig& config, engine::ModelParams* params,
                            size_t g, int64_t lo, int64_t hi, float* flat, bool to_flat);

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_LAYOUT_H_
