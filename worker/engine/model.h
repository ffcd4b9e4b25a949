// The Hugging Face Llama architecture (LlamaForCausalLM) on the CPU: parameters, forward,
// hand-written backward and mean token cross-entropy, templated on the element type
// (float for training, double for gradient checks).
#ifndef LUMEN_WORKER_ENGINE_MODEL_H_
#define LUMEN_WORKER_ENGINE_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/thread_pool.h"

namespace lumen::engine {

// Model shape, with Hugging Face config.json field names. Plain data.
struct ModelConfig {
  int64_t hidden_size = 256;
  int64_t intermediate_size = 688;
  int64_t num_hidden_layers = 4;
  int64_t num_attention_heads = 4;
  // Must divide num_attention_heads (grouped-query attention).
  int64_t num_key_value_heads = 4;
  int64_t vocab_size = 8000;
  int64_t max_position_embeddings = 256;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  // When true there is no lm_head tensor; the LM head reuses embed_tokens.
  bool tie_word_embeddings = false;
  // Standard deviation of the normal initialisation of every matrix.
  double init_std = 0.02;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

// Returns OK when the shape is usable by this engine, else INVALID_ARGUMENT naming the field.
absl::Status CheckModelConfig(const ModelConfig& config);

// Number of parameters (lm_head counted only when untied).
int64_t ParameterCount(const ModelConfig& config);

// One decoder layer's parameters, each a contiguous buffer in HF layout.
template <typename T>
struct LayerParamsT {
  std::vector<T> input_layernorm;           // [hidden]
  std::vector<T> q_proj;                    // [heads*head_dim, hidden]
  std::vector<T> k_proj;                    // [kv_heads*head_dim, hidden]
  std::vector<T> v_proj;                    // [kv_heads*head_dim, hidden]
  std::vector<T> o_proj;                    // [hidden, heads*head_dim]
  std::vector<T> post_attention_layernorm;  // [hidden]
  std::vector<T> gate_proj;                 // [intermediate, hidden]
  std::vector<T> up_proj;                   // [intermediate, hidden]
  std::vector<T> down_proj;                 // [hidden, intermediate]
};

// All parameters (or gradients, or optimizer moments: same shapes).
template <typename T>
struct ModelParamsT {
  std::vector<T> embed_tokens;  // [vocab, hidden]
  std::vector<LayerParamsT<T>> layers;
  std::vector<T> norm;     // [hidden]
  std::vector<T> lm_head;  // [vocab, hidden]; empty when tie_word_embeddings
};

using LayerParams = LayerParamsT<float>;
using ModelParams = ModelParamsT<float>;

// Allocates zero-filled buffers of the right sizes.
template <typename T>
ModelParamsT<T> AllocateParams(const ModelConfig& config);

// A named view of one tensor of a ModelParamsT.
template <typename T>
struct NamedTensor {
  std::string name;  // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  std::vector<T>* data;
};

// The tensors of `params` in Hugging Face named_parameters() order: model.embed_tokens.weight;
// then per layer i: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
// post_attention_layernorm; then model.norm.weight; then lm_head.weight (only when untied).
template <typename T>
std::vector<NamedTensor<T>> NamedTensors(const ModelConfig& config, ModelParamsT<T>* params);

// Llama forward/backward for micro-batches of B sequences of T tokens (positions 0..T-1).
// Owns the parameters, their gradients and the activation/scratch buffers (allocated on the
// first call for a given B, T and reused). Thread-compatible: one thread at a time; the
// kernels inside use `pool`.
template <typename T>
class LlamaModelT {
 public:
  // `pool` must outlive the model; nullptr runs the loops on the calling thread (OpenBLAS
  // then threads the matrix products as configured). A pool of more than one thread sets
  // OpenBLAS to one thread, process-wide: the model splits its products over the pool itself.
  // With activation_checkpointing only each layer's input is kept during the forward and the
  // layer is recomputed during the backward; results are bit-identical to the non-checkpointed
  // path.
  LlamaModelT(const ModelConfig& config, bool activation_checkpointing, ThreadPool* pool);
  ~LlamaModelT();

  const ModelConfig& config() const { return config_; }
  ModelParamsT<T>& params() { return params_; }
  const ModelParamsT<T>& params() const { return params_; }
  ModelParamsT<T>& grads() { return grads_; }
  void ZeroGrads();

  // Mean token cross-entropy of one micro-batch; inputs/targets hold batch*seq ids, row-major.
  // INVALID_ARGUMENT for ids outside [0, vocab) or seq > max_position_embeddings.
  absl::StatusOr<double> Forward(const int32_t* inputs, const int32_t* targets, int64_t batch,
                                 int64_t seq);

  // As Forward, and adds grad_scale * d(mean loss)/d(param) to grads().
  absl::StatusOr<double> ForwardBackward(const int32_t* inputs, const int32_t* targets,
                                         int64_t batch, int64_t seq, T grad_scale);

  // Logits [batch*seq, vocab] for the inputs.
  absl::Status Logits(const int32_t* inputs, int64_t batch, int64_t seq, std::vector<T>* logits);

 private:
  struct Buffers;
  absl::Status CheckIds(const int32_t* ids, int64_t n, const char* what) const;
  void EnsureBuffers(int64_t batch, int64_t seq);
  // Runs embedding + layers + final norm + lm_head; fills buffers' logits.
  void RunForward(const int32_t* inputs, int64_t batch, int64_t seq);
  void LayerForward(int layer, const T* x, T* out, int64_t batch, int64_t seq, int acts_index);
  void LayerBackward(int layer, const T* x, T* dy, T* dx, int64_t batch, int64_t seq,
                     int acts_index);

  const ModelConfig config_;
  const bool checkpointing_;
  ThreadPool* const pool_;
  ModelParamsT<T> params_;
  ModelParamsT<T> grads_;
  std::unique_ptr<Buffers> buf_;
};

using LlamaModel = LlamaModelT<float>;

extern template class LlamaModelT<float>;
extern template class LlamaModelT<double>;

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_MODEL_H_
