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

// Initial weights handed out a tensor at a time, so that a trainer whose state lives elsewhere
// (the memstore, a streamed GPU job's host state) never holds a whole copy of them: a
// checkpoint's file (WeightsReader) or the seeded random initialisation (RandomWeights).
class WeightsSource {
 public:
  virtual ~WeightsSource() = default;
  // Tensor `name` (a Hugging Face name of the model) into a buffer of its size. A source may
  // require the NamedTensors order (RandomWeights does, and says so).
  virtual absl::Status Read(const std::string& name, float* dst) = 0;
};

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

  // ---- Layer-wise execution (used by OffloadTrainer) ----
  // Each call below runs one piece of the network for ONE micro-batch of batch x seq tokens
  // and reads/writes only the parameter and gradient buffers it names, so the caller may load
  // e.g. params().layers[l] and grads().layers[l] just before a call and release them (swap
  // with an empty vector) just after. Activations live in caller-owned arrays of
  // batch*seq*hidden_size elements; the decoder-layer and head calls use internal scratch
  // (LayerScratchBytes / HeadScratchBytes, allocated on first use, freed by Release*Scratch).
  // Running EmbedForward, DecoderLayerForward for every layer, HeadForwardBackward,
  // DecoderLayerBackward in reverse and EmbedBackward gives bit-identically the losses and
  // gradient contributions of ForwardBackward (the checkpointed backward is the same code).
  // Shape errors: INVALID_ARGUMENT; a needed buffer with the wrong size (not loaded):
  // FAILED_PRECONDITION naming the tensor.

  // A model whose parameters and gradients are all empty (layers holds num_hidden_layers
  // empty entries): nothing of the model's size is allocated. `pool` as for the constructor.
  static std::unique_ptr<LlamaModelT> CreateUnallocated(const ModelConfig& config,
                                                        ThreadPool* pool);

  // Bytes of internal scratch a decoder-layer call (forward or backward with recompute)
  // holds for one micro-batch of batch x seq, and that HeadForwardBackward holds (logits
  // included).
  int64_t LayerScratchBytes(int64_t batch, int64_t seq) const;
  int64_t HeadScratchBytes(int64_t batch, int64_t seq) const;
  // Frees the scratch; the next call reallocates it.
  void ReleaseLayerScratch();
  void ReleaseHeadScratch();

  // x[batch*seq, hidden] = embed_tokens[inputs]. Needs params().embed_tokens.
  absl::Status EmbedForward(const int32_t* inputs, int64_t batch, int64_t seq, T* x);
  // grads().embed_tokens[inputs[r]] += dx[r], rows in order. Needs grads().embed_tokens.
  absl::Status EmbedBackward(const int32_t* inputs, int64_t batch, int64_t seq, const T* dx);
  // out = decoder layer `layer` applied to x, keeping nothing (the backward recomputes).
  // Needs params().layers[layer].
  absl::Status DecoderLayerForward(int layer, const T* x, T* out, int64_t batch, int64_t seq);
  // Recomputes the layer's forward from its input x, adds its parameter gradients (for the
  // output gradient dy) to grads().layers[layer] and writes the input gradient to dx. dy is
  // clobbered. Needs params().layers[layer] and grads().layers[layer].
  absl::Status DecoderLayerBackward(int layer, const T* x, T* dy, T* dx, int64_t batch,
                                    int64_t seq);
  // Final norm + LM head + cross-entropy on the last layer's output x: returns the mean token
  // loss, adds grad_scale * d(mean loss)/d(param) to grads().norm and to grads().lm_head (or
  // grads().embed_tokens when tied), and writes d(grad_scale * mean loss)/dx to dx. Needs
  // params().norm, the head weight and those gradients.
  absl::StatusOr<double> HeadForwardBackward(const T* x, const int32_t* targets, int64_t batch,
                                             int64_t seq, T grad_scale, T* dx);

 private:
  struct Buffers;
  struct UnallocatedTag {};
  LlamaModelT(const ModelConfig& config, ThreadPool* pool, UnallocatedTag);
  absl::Status CheckIds(const int32_t* ids, int64_t n, const char* what) const;
  void EnsureBuffers(int64_t batch, int64_t seq);
  // Runs embedding + layers + final norm + lm_head; fills buffers' logits.
  void RunForward(const int32_t* inputs, int64_t batch, int64_t seq);
  void LayerForward(Buffers& b, int layer, const T* x, T* out, int64_t batch, int64_t seq,
                    int acts_index);
  void LayerBackward(Buffers& b, int layer, const T* x, T* dy, T* dx, int64_t batch,
                     int64_t seq, int acts_index);
  absl::Status CheckShape(int64_t batch, int64_t seq) const;
  absl::Status CheckLayerLoaded(int layer, bool with_grads) const;
  void EnsureLayerScratch(int64_t batch, int64_t seq);
  void EnsureHeadScratch(int64_t batch, int64_t seq);

  const ModelConfig config_;
  const bool checkpointing_;
  ThreadPool* const pool_;
  ModelParamsT<T> params_;
  ModelParamsT<T> grads_;
  std::unique_ptr<Buffers> buf_;
  // Scratch of the layer-wise calls, apart from buf_ so that the whole-model path keeps its
  // buffers.
  std::unique_ptr<Buffers> layer_buf_;
  std::unique_ptr<Buffers> head_buf_;
};

using LlamaModel = LlamaModelT<float>;

extern template class LlamaModelT<float>;
extern template class LlamaModelT<double>;

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_MODEL_H_
