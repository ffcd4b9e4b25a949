#include "coordinator/job_spec.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/yaml_proto.h"

namespace lumen {
namespace {

struct Preset {
  const char* name;
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab, max_pos;
  double rope_theta;
  bool tie;
};

// Published shapes (Llama 3 from Meta's config.json files); `lumen-104b` is 66 Llama-3-style
// layers at hidden 12288, about 104.5 B parameters.
constexpr Preset kPresets[] = {
    {"tiny", 64, 176, 2, 4, 2, 256, 256, 10000.0, false},
    {"small", 384, 1024, 6, 6, 2, 8000, 512, 10000.0, false},
    {"llama3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, false},
    {"llama3-70b", 8192, 28672, 80, 64, 8, 128256, 8192, 500000.0, false},
    {"lumen-104b", 12288, 32768, 66, 96, 8, 128256, 8192, 500000.0, false},
};

absl::Status Invalid(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

void ApplyModelDefaults(ModelSpec* m) {
  if (!m->has_rope_theta()) m->set_rope_theta(10000.0);
  if (!m->has_rms_norm_eps()) m->set_rms_norm_eps(1e-5);
  if (!m->has_tie_word_embeddings()) m->set_tie_word_embeddings(false);
  if (!m->has_init_std()) m->set_init_std(0.02);
  if (!m->has_num_key_value_heads() && m->has_num_attention_heads()) {
    m->set_num_key_value_heads(m->num_attention_heads());
  }
}

std::string Absolute(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path[0] == '/') return path;
  if (path.rfind("~/", 0) == 0 && getenv("HOME") != nullptr) {
    return absl::StrCat(getenv("HOME"), path.substr(1));
  }
  return (std::filesystem::path(base_dir) / path).lexically_normal().string();
}

absl::Status Positive(absl::string_view field, int64_t value) {
  if (value <= 0) return Invalid(field, absl::StrCat(value, " must be positive"));
  return absl::OkStatus();
}

absl::Status ValidateModel(const ModelSpec& m) {
  const std::pair<const char*, int64_t> required[] = {
      {"model.hidden_size", m.hidden_size()},
      {"model.intermediate_size", m.intermediate_size()},
      {"model.num_hidden_layers", m.num_hidden_layers()},
      {"model.num_attention_heads", m.num_attention_heads()},
      {"model.num_key_value_heads", m.num_key_value_heads()},
      {"model.vocab_size", m.vocab_size()},
      {"model.max_position_embeddings", m.max_position_embeddings()},
  };
  for (const auto& [field, value] : required) {
    if (value == 0) return Invalid(field, "is required (set it or use model.preset)");
    RETURN_IF_ERROR(Positive(field, value));
  }
  if (m.hidden_size() % m.num_attention_heads() != 0) {
    return Invalid("model.num_attention_heads",
                   absl::StrCat(m.num_attention_heads(), " does not divide model.hidden_size ",
                                m.hidden_size()));
  }
  if (m.num_attention_heads() % m.num_key_value_heads() != 0) {
    return Invalid("model.num_key_value_heads",
                   absl::StrCat(m.num_key_value_heads(),
                                " does not divide model.num_attention_heads ",
                                m.num_attention_heads()));
  }
  const int64_t head_dim = m.hidden_size() / m.num_attention_heads();
  if (head_dim % 2 != 0) {
    return Invalid("model.num_attention_heads",
                   absl::StrCat("head dimension ", m.hidden_size(), "/", m.num_attention_heads(),
                                " = ", head_dim, " must be even for rotary embeddings"));
  }
  if (m.vocab_size() > (int64_t{1} << 31)) {
    return Invalid("model.vocab_size", absl::StrCat(m.vocab_size(), " is larger than 2^31"));
  }
  if (!(m.rope_theta() > 0)) {
    return Invalid("model.rope_theta", absl::StrCat(m.rope_theta(), " must be positive"));
  }
  if (!(m.rms_norm_eps() > 0)) {
    return Invalid("model.rms_norm_eps", absl::StrCat(m.rms_norm_eps(), " must be positive"));
  }
  if (!(m.init_std() > 0)) {
    return Invalid("model.init_std", absl::StrCat(m.init_std(), " must be positive"));
  }
  return absl::OkStatus();
}

absl::Status ValidateData(const JobSpec& spec) {
  const DataSpec& d = spec.data();
  if (d.path().empty()) return Invalid("data.path", "is required");
  if (d.token_dtype() == TOKEN_DTYPE_UNSPECIFIED) {
    return Invalid("data.token_dtype", "is required (uint16 or uint32)");
  }
  const int64_t width = d.token_dtype() == TOKEN_DTYPE_UINT16 ? 2 : 4;
  if (width == 2 && spec.model().vocab_size() > 65536) {
    return Invalid("data.token_dtype",
                   absl::StrCat("uint16 cannot hold the token ids of model.vocab_size ",
                                spec.model().vocab_size(), "; use uint32"));
  }
  struct stat st;
  if (stat(d.path().c_str(), &st) != 0) {
    return Invalid("data.path", absl::StrCat(d.path(), ": ", strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) return Invalid("data.path", absl::StrCat(d.path(), " is not a file"));
  std::ifstream in(d.path(), std::ios::binary);
  if (!in) return Invalid("data.path", absl::StrCat(d.path(), " cannot be read"));
  if (st.st_size % width != 0) {
    return Invalid("data.token_dtype",
                   absl::StrCat("the size of ", d.path(), " (", st.st_size,
                                " bytes) is not a multiple of ", width, " bytes; is it really ",
                                width == 2 ? "uint16" : "uint32", "?"));
  }
  const int64_t tokens = st.st_size / width;
  if (tokens < spec.train().seq_len() + 2) {
    return Invalid("data.path", absl::StrCat(d.path(), " holds ", tokens,
                                             " tokens; train.seq_len ", spec.train().seq_len(),
                                             " needs at least ", spec.train().seq_len() + 2));
  }
  // A token id beyond the vocabulary is usually a dtype or tokenizer mix-up: check a prefix
  // here so the job fails at submit, not hours later (the worker checks every window it reads).
  constexpr int64_t kCheckTokens = 1 << 20;
  const int64_t n = std::min(tokens, kCheckTokens);
  std::vector<char> buf(n * width);
  in.read(buf.data(), buf.size());
  for (int64_t i = 0; i < n; ++i) {
    uint32_t token = 0;
    if (width == 2) {
      token = static_cast<uint8_t>(buf[2 * i]) | static_cast<uint8_t>(buf[2 * i + 1]) << 8;
    } else {
      for (int b = 3; b >= 0; --b) token = (token << 8) | static_cast<uint8_t>(buf[4 * i + b]);
    }
    if (token >= spec.model().vocab_size()) {
      return Invalid("data.path", absl::StrCat("token ", token, " at index ", i, " of ",
                                               d.path(), " is not below model.vocab_size ",
                                               spec.model().vocab_size(),
                                               " (wrong data.token_dtype or tokenizer?)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> ModelPresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.push_back(p.name);
  return names;
}

absl::StatusOr<ModelSpec> ModelPreset(absl::string_view name) {
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    ModelSpec m;
    m.set_hidden_size(p.hidden);
    m.set_intermediate_size(p.intermediate);
    m.set_num_hidden_layers(p.layers);
    m.set_num_attention_heads(p.heads);
    m.set_num_key_value_heads(p.kv_heads);
    m.set_vocab_size(p.vocab);
    m.set_max_position_embeddings(p.max_pos);
    m.set_rope_theta(p.rope_theta);
    m.set_rms_norm_eps(1e-5);
    m.set_tie_word_embeddings(p.tie);
    m.set_init_std(0.02);
    return m;
  }
  return absl::NotFoundError(absl::StrCat("unknown preset '", name,
                                          "'; known presets: ",
                                          absl::StrJoin(ModelPresetNames(), ", ")));
}

int64_t ParameterCount(const ModelSpec& m) {
  const int64_t h = m.hidden_size();
  const int64_t head_dim = m.num_attention_heads() > 0 ? h / m.num_attention_heads() : 0;
  const int64_t kv = m.num_key_value_heads() * head_dim;
  const int64_t per_layer = 2 * h * h + 2 * h * kv + 3 * h * m.intermediate_size() + 2 * h;
  const int64_t embed = m.vocab_size() * h;
  return embed + m.num_hidden_layers() * per_layer + h + (m.tie_word_embeddings() ? 0 : embed);
}

absl::Status ValidateJobSpec(const JobSpec& spec, const NodeLimits& limits) {
  static const std::regex kName("[A-Za-z0-9][A-Za-z0-9._-]{0,63}");
  if (!std::regex_match(spec.name(), kName)) {
    return Invalid("name", absl::StrCat("'", spec.name(),
                                        "' must be 1-64 letters, digits, '.', '_' or '-'"));
  }
  RETURN_IF_ERROR(ValidateModel(spec.model()));
  const TrainSpec& t = spec.train();
  RETURN_IF_ERROR(Positive("train.steps", t.steps()));
  RETURN_IF_ERROR(Positive("train.seq_len", t.seq_len()));
  RETURN_IF_ERROR(Positive("train.micro_batch_size", t.micro_batch_size()));
  RETURN_IF_ERROR(Positive("train.grad_accum_steps", t.grad_accum_steps()));
  if (t.seq_len() > spec.model().max_position_embeddings()) {
    return Invalid("train.seq_len",
                   absl::StrCat(t.seq_len(), " exceeds model.max_position_embeddings ",
                                spec.model().max_position_embeddings()));
  }
  const OptimizerSpec& o = spec.optimizer();
  if (!(o.lr() > 0)) return Invalid("optimizer.lr", absl::StrCat(o.lr(), " must be positive"));
  if (o.betas_size() != 2) {
    return Invalid("optimizer.betas", absl::StrCat("needs exactly 2 values, got ", o.betas_size()));
  }
  for (int i = 0; i < 2; ++i) {
    if (!(o.betas(i) >= 0 && o.betas(i) < 1)) {
      return Invalid(absl::StrCat("optimizer.betas[", i, "]"),
                     absl::StrCat(o.betas(i), " must be in [0, 1)"));
    }
  }
  if (!(o.eps() > 0)) return Invalid("optimizer.eps", absl::StrCat(o.eps(), " must be positive"));
  if (o.weight_decay() < 0) {
    return Invalid("optimizer.weight_decay", absl::StrCat(o.weight_decay(), " must be >= 0"));
  }
  if (o.grad_clip() < 0) {
    return Invalid("optimizer.grad_clip", absl::StrCat(o.grad_clip(), " must be >= 0 (0 = off)"));
  }
  const ScheduleSpec& s = o.schedule();
  if (s.warmup_steps() < 0 || s.warmup_steps() > t.steps()) {
    return Invalid("optimizer.schedule.warmup_steps",
                   absl::StrCat(s.warmup_steps(), " must be in [0, train.steps = ", t.steps(),
                                "]"));
  }
  if (s.min_lr() < 0 || s.min_lr() > o.lr()) {
    return Invalid("optimizer.schedule.min_lr",
                   absl::StrCat(s.min_lr(), " must be in [0, optimizer.lr = ", o.lr(), "]"));
  }
  if (spec.checkpoint().every_steps() < 0) {
    return Invalid("checkpoint.every_steps",
                   absl::StrCat(spec.checkpoint().every_steps(), " must be >= 0 (0 = at the end)"));
  }
  const ResourcesSpec& r = spec.resources();
  if (r.workers() < 1 || r.workers() > limits.workers) {
    return Invalid("resources.workers",
                   absl::StrCat(r.workers(), " must be between 1 and this node's ",
                                limits.workers, " workers"));
  }
  if (r.workers() > spec.train().grad_accum_steps()) {
    return Invalid("train.grad_accum_steps",
                   absl::StrCat(spec.train().grad_accum_steps(), " micro-batches a step cannot "
                                "be shared by resources.workers ", r.workers(),
                                ": each worker trains at least one"));
  }
  if (r.precision() == PRECISION_BF16 && !limits.has_cuda) {
    return Invalid("resources.precision",
                   "bf16 needs a CUDA device; this node's workers are cpu, which train in fp32 "
                   "(set fp32 or leave the field out)");
  }
  if (r.precision() == PRECISION_FP32 && limits.has_cuda) {
    return Invalid("resources.precision",
                   "fp32: this node's workers are cuda, which train in bf16 (bf16 weights and "
                   "activations, fp32 master weights, gradients and AdamW state); set bf16 or "
                   "leave the field out");
  }
  if (!spec.resume_from().empty()) {
    if (!spec.init_from().empty()) {
      return Invalid("resume_from", "and init_from both set: resume_from loads the checkpoint's "
                                    "weights too; keep one");
    }
    const std::string optimizer = spec.resume_from() + "/optimizer.safetensors";
    struct stat st;
    if (stat(spec.resume_from().c_str(), &st) != 0) {
      return Invalid("resume_from", absl::StrCat(spec.resume_from(), ": ", strerror(errno)));
    }
    if (stat(optimizer.c_str(), &st) != 0) {
      return Invalid("resume_from",
                     absl::StrCat(spec.resume_from(), " is not a checkpoint directory: ",
                                  optimizer, ": ", strerror(errno)));
    }
  }
  if (!spec.init_from().empty()) {
    struct stat st;
    if (stat(spec.init_from().c_str(), &st) != 0) {
      return Invalid("init_from", absl::StrCat(spec.init_from(), ": ", strerror(errno)));
    }
  }
  return ValidateData(spec);
}

absl::StatusOr<JobSpec> ResolveJobSpec(absl::string_view yaml, const std::string& base_dir,
                                       const NodeLimits& limits) {
  JobSpec spec;
  RETURN_IF_ERROR(YamlToProto(yaml, &spec));
  ModelSpec* model = spec.mutable_model();
  if (!model->preset().empty()) {
    auto preset = ModelPreset(model->preset());
    if (!preset.ok()) return Invalid("model.preset", preset.status().message());
    ModelSpec merged = *preset;
    merged.MergeFrom(*model);  // Fields set in the spec win over the preset.
    *model = merged;
  }
  ApplyModelDefaults(model);
  if (spec.name().empty()) spec.set_name("job");
  DataSpec* data = spec.mutable_data();
  data->set_path(Absolute(data->path(), base_dir));
  if (data->order() == DATA_ORDER_UNSPECIFIED) data->set_order(DATA_ORDER_SEQUENTIAL);
  spec.set_init_from(Absolute(spec.init_from(), base_dir));
  spec.set_resume_from(Absolute(spec.resume_from(), base_dir));
  TrainSpec* train = spec.mutable_train();
  if (train->grad_accum_steps() == 0) train->set_grad_accum_steps(1);
  OptimizerSpec* opt = spec.mutable_optimizer();
  if (opt->betas_size() == 0) {
    opt->add_betas(0.9);
    opt->add_betas(0.999);
  }
  if (!opt->has_eps()) opt->set_eps(1e-8);
  if (opt->schedule().kind() == SCHEDULE_KIND_UNSPECIFIED) {
    opt->mutable_schedule()->set_kind(SCHEDULE_KIND_CONSTANT);
  }
  ResourcesSpec* res = spec.mutable_resources();
  if (res->workers() == 0) res->set_workers(1);
  if (res->precision() == PRECISION_UNSPECIFIED) {
    res->set_precision(limits.has_cuda ? PRECISION_BF16 : PRECISION_FP32);
  }
  RETURN_IF_ERROR(ValidateJobSpec(spec, limits));
  return spec;
}

}  // namespace lumen
