#include "coordinator/planner/model_desc.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/yaml_proto.h"
#include "coordinator/job_spec.h"

namespace lumen {

const char* TensorClassName(TensorClass c) {
  switch (c) {
    case TensorClass::kParams:
      return "params";
    case TensorClass::kMaster:
      return "master";
    case TensorClass::kGrads:
      return "grads";
    case TensorClass::kAdamM:
      return "adam_m";
    case TensorClass::kAdamV:
      return "adam_v";
    case TensorClass::kActivations:
      return "activations";
  }
  return "?";
}

ClassBytes ModelDesc::TotalBytes() const {
  ClassBytes total{};
  for (const LayerDesc& l : layers) {
    for (int c = 0; c < kNumTensorClasses; ++c) total[c] += l.bytes[c];
  }
  return total;
}

int64_t ModelDesc::StateBytes() const {
  const ClassBytes t = TotalBytes();
  return t[0] + t[1] + t[2] + t[3] + t[4];
}

double ModelDesc::StepFlops() const {
  double per_token = 0;
  for (const LayerDesc& l : layers) per_token += 4 * l.forward_flops_per_token;
  return per_token * static_cast<double>(TokensPerStep());
}

int64_t ModelDesc::OptimizerBytesPerParam() const {
  // Reads: grad (compute), master (4, or the fp32 compute copy), m, v. Writes: master, m, v,
  // and in bf16 the new compute copy.
  return compute_bytes + 12 + 12 + (bf16 ? compute_bytes : 0);
}

namespace {

LayerDesc Layer(const ModelDesc& m, std::string name, LayerKind kind, int64_t params,
                int64_t input_bytes_per_token, int64_t working_per_token,
                double forward_flops_per_token) {
  LayerDesc l;
  l.name = std::move(name);
  l.kind = kind;
  l.parameters = params;
  const int64_t c = m.compute_bytes;
  const int64_t tokens_mb = m.micro_batch_size * m.seq_len;
  l.bytes[static_cast<int>(TensorClass::kParams)] = params * c;
  l.bytes[static_cast<int>(TensorClass::kMaster)] = m.bf16 ? params * 4 : 0;
  l.bytes[static_cast<int>(TensorClass::kGrads)] = params * c;
  l.bytes[static_cast<int>(TensorClass::kAdamM)] = params * 4;
  l.bytes[static_cast<int>(TensorClass::kAdamV)] = params * 4;
  l.activation_bytes_per_micro_batch = tokens_mb * input_bytes_per_token;
  l.bytes[static_cast<int>(TensorClass::kActivations)] =
      l.activation_bytes_per_micro_batch * m.micro_batches;
  l.working_bytes_per_micro_batch = tokens_mb * working_per_token;
  l.forward_flops_per_token = forward_flops_per_token;
  return l;
}

}  // namespace

Precision PlanningPrecision(const JobSpec& spec, bool device_shares_host_cpu) {
  if (spec.resources().precision() != PRECISION_UNSPECIFIED) return spec.resources().precision();
  return device_shares_host_cpu ? PRECISION_FP32 : PRECISION_BF16;
}

ModelDesc DescribeModel(const JobSpec& spec) {
  const ModelSpec& ms = spec.model();
  ModelDesc m;
  m.bf16 = spec.resources().precision() == PRECISION_BF16;
  m.compute_bytes = m.bf16 ? 2 : 4;
  m.micro_batch_size = spec.train().micro_batch_size();
  m.seq_len = spec.train().seq_len();
  m.micro_batches = std::max<int64_t>(1, spec.train().grad_accum_steps());
  m.parameters = ParameterCount(ms);
  const int64_t h = ms.hidden_size();
  m.hidden_size = h;
  const int64_t inter = ms.intermediate_size();
  const int64_t kv = ms.num_key_value_heads() * (h / ms.num_attention_heads());
  const int64_t vocab = ms.vocab_size();
  const int64_t c = m.compute_bytes;
  const double t = static_cast<double>(m.seq_len);

  // Embedding: a gather (no FLOPs); its input is the token ids.
  m.layers.push_back(Layer(m, "embed", LayerKind::kEmbedding, vocab * h, 4, 2 * h * c, 0));
  // Decoder layer: q, o (h×h), k, v (h×kv), gate, up, down (h×I), two norms.
  const int64_t matmul = 2 * h * h + 2 * h * kv + 3 * h * inter;
  // Causal attention scores and weighted sum, 2·T·h per token (half of the 4·T·h of a full
  // mask; fused attention skips the masked blocks).
  const double attention = 2.0 * t * static_cast<double>(h);
  // Intermediates kept for the backward of one micro-batch, per token: norm outputs, q, k, v,
  // attention output, projections, gate, up, SwiGLU — and as much again for their gradients.
  const int64_t working = 2 * (7 * h + 2 * kv + 3 * inter) * c;
  for (int64_t i = 0; i < ms.num_hidden_layers(); ++i) {
    m.layers.push_back(Layer(m, absl::StrCat("layers.", i), LayerKind::kDecoder, matmul + 2 * h,
                             h * c, working, 2.0 * matmul + attention));
    m.layers.back().tensors = 9;  // two norms, q, k, v, o, gate, up, down
  }
  // Head: final norm and LM head (fp32 logits per micro-batch; their gradient overwrites them
  // in place, as the engine's HeadForwardBackward does).
  const bool tied = ms.tie_word_embeddings();
  LayerDesc head = Layer(m, "head", LayerKind::kHead, h + (tied ? 0 : vocab * h), h * c,
                         vocab * 4 + 2 * h * c, 2.0 * vocab * h);
  if (tied) head.shared_param_bytes = vocab * h * c;
  head.tensors = tied ? 1 : 2;
  m.layers.push_back(head);
  return m;
}

absl::StatusOr<JobSpec> ParseJobSpecForPlanning(absl::string_view yaml) {
  JobSpec spec;
  RETURN_IF_ERROR(YamlToProto(yaml, &spec));
  ModelSpec* model = spec.mutable_model();
  if (!model->preset().empty()) {
    auto preset = ModelPreset(model->preset());
    if (!preset.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.preset: ", preset.status().message()));
    }
    ModelSpec merged = *preset;
    merged.MergeFrom(*model);  // Fields set in the spec win over the preset.
    *model = merged;
  }
  // The defaults of ResolveJobSpec that matter for planning.
  if (!model->has_num_key_value_heads() && model->has_num_attention_heads()) {
    model->set_num_key_value_heads(model->num_attention_heads());
  }
  if (!model->has_tie_word_embeddings()) model->set_tie_word_embeddings(false);
  if (spec.train().grad_accum_steps() == 0) spec.mutable_train()->set_grad_accum_steps(1);
  if (spec.resources().workers() == 0) spec.mutable_resources()->set_workers(1);
  const std::pair<const char*, int64_t> required[] = {
      {"model.hidden_size", model->hidden_size()},
      {"model.intermediate_size", model->intermediate_size()},
      {"model.num_hidden_layers", model->num_hidden_layers()},
      {"model.num_attention_heads", model->num_attention_heads()},
      {"model.num_key_value_heads", model->num_key_value_heads()},
      {"model.vocab_size", model->vocab_size()},
      {"train.seq_len", spec.train().seq_len()},
      {"train.micro_batch_size", spec.train().micro_batch_size()},
      {"train.grad_accum_steps", spec.train().grad_accum_steps()},
  };
  for (const auto& [field, value] : required) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": ", value, " must be positive (set it or use model.preset)"));
    }
  }
  if (model->hidden_size() % model->num_attention_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.num_attention_heads: ", model->num_attention_heads(),
        " does not divide model.hidden_size ", model->hidden_size()));
  }
  if (model->num_attention_heads() % model->num_key_value_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.num_key_value_heads: ", model->num_key_value_heads(),
        " does not divide model.num_attention_heads ", model->num_attention_heads()));
  }
  return spec;
}

}  // namespace lumen
