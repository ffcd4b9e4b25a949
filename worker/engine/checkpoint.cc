#include "worker/engine/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/json.h"
#include "worker/engine/safetensors.h"

namespace lumen::engine {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::vector<NamedTensor<float>> Tensors(const ModelConfig& c, const ModelParams& p) {
  return NamedTensors(c, const_cast<ModelParams*>(&p));
}

// Copies every tensor of `config` from `file` (with `suffix` appended to names) into `out`.
absl::Status CopyTensors(const std::string& path, const SafetensorsFile& file,
                         const ModelConfig& config, const std::string& suffix, ModelParams* out) {
  for (NamedTensor<float>& t : NamedTensors(config, out)) {
    const std::string name = t.name + suffix;
    auto it = file.tensors.find(name);
    if (it == file.tensors.end()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " (shape ",
                                                     ShapeString(t.shape), ") is missing"));
    }
    if (it->second.shape != t.shape) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has shape ",
                                                     ShapeString(it->second.shape),
                                                     ", the model needs ", ShapeString(t.shape)));
    }
    *t.data = it->second.data;
  }
  return absl::OkStatus();
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot create ", tmp));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace

std::string HfConfigJson(const ModelConfig& c) {
  return absl::StrFormat(
      "{\n"
      "  \"architectures\": [\"LlamaForCausalLM\"],\n"
      "  \"model_type\": \"llama\",\n"
      "  \"hidden_size\": %d,\n"
      "  \"intermediate_size\": %d,\n"
      "  \"num_hidden_layers\": %d,\n"
      "  \"num_attention_heads\": %d,\n"
      "  \"num_key_value_heads\": %d,\n"
      "  \"vocab_size\": %d,\n"
      "  \"max_position_embeddings\": %d,\n"
      "  \"rope_theta\": %.17g,\n"
      "  \"rms_norm_eps\": %.17g,\n"
      "  \"tie_word_embeddings\": %s,\n"
      "  \"hidden_act\": \"silu\",\n"
      "  \"attention_bias\": false,\n"
      "  \"initializer_range\": %.17g,\n"
      "  \"torch_dtype\": \"float32\"\n"
      "}\n",
      c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
      c.num_key_value_heads, c.vocab_size, c.max_position_embeddings, c.rope_theta,
      c.rms_norm_eps, c.tie_word_embeddings ? "true" : "false", c.init_std);
}

absl::StatusOr<ModelConfig> ReadHfConfig(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text;
  char buf[4096];
  size_t r;
  while ((r = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, r);
  std::fclose(f);
  auto json = ParseJson(text);
  if (!json.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", json.status().message()));
  }
  ModelConfig c;
  auto get_int = [&](const char* key, int64_t* out, bool required) -> absl::Status {
    const JsonValue* v = json->Find(key);
    if (v == nullptr && !required) return absl::OkStatus();
    if (v == nullptr || !v->AsInt64(out)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": field ", key,
                                                     v == nullptr ? " is missing"
                                                                  : " is not an integer"));
    }
    return absl::OkStatus();
  };
  auto get_double = [&](const char* key, double* out) -> absl::Status {
    const JsonValue* v = json->Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (v->type != JsonValue::Type::kNumber) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": field ", key, " is not a number"));
    }
    *out = v->number;
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_int("hidden_size", &c.hidden_size, true));
  RETURN_IF_ERROR(get_int("intermediate_size", &c.intermediate_size, true));
  RETURN_IF_ERROR(get_int("num_hidden_layers", &c.num_hidden_layers, true));
  RETURN_IF_ERROR(get_int("num_attention_heads", &c.num_attention_heads, true));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(get_int("num_key_value_heads", &c.num_key_value_heads, false));
  RETURN_IF_ERROR(get_int("vocab_size", &c.vocab_size, true));
  RETURN_IF_ERROR(get_int("max_position_embeddings", &c.max_position_embeddings, false));
  RETURN_IF_ERROR(get_double("rope_theta", &c.rope_theta));
  RETURN_IF_ERROR(get_double("rms_norm_eps", &c.rms_norm_eps));
  RETURN_IF_ERROR(get_double("initializer_range", &c.init_std));
  if (const JsonValue* v = json->Find("tie_word_embeddings"); v != nullptr) {
    if (v->type != JsonValue::Type::kBool) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": field tie_word_embeddings is not a boolean"));
    }
    c.tie_word_embeddings = v->boolean;
  }
  return c;
}

absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const ModelParams& params) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create directory ", dir, ": ", ec.message()));
  }
  std::vector<TensorView> views;
  for (const NamedTensor<float>& t : Tensors(config, params)) {
    views.push_back({t.name, t.shape, t.data->data()});
  }
  RETURN_IF_ERROR(WriteSafetensors(dir + "/" + kModelFile, views, {{"format", "pt"}}));
  return WriteText(dir + "/" + kConfigFile, HfConfigJson(config));
}

absl::Status LoadWeights(const std::string& path, const ModelConfig& config,
                         ModelParams* params) {
  std::string file = path;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) file = path + "/" + kModelFile;
  ASSIGN_OR_RETURN(SafetensorsFile st, ReadSafetensors(file));
  ModelParams loaded = AllocateParams<float>(config);
  RETURN_IF_ERROR(CopyTensors(file, st, config, "", &loaded));
  *params = std::move(loaded);
  return absl::OkStatus();
}

absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const ModelParams& exp_avg, const ModelParams& exp_avg_sq,
                                int64_t step) {
  std::vector<TensorView> views;
  for (const NamedTensor<float>& t : Tensors(config, exp_avg)) {
    views.push_back({t.name + ".exp_avg", t.shape, t.data->data()});
  }
  for (const NamedTensor<float>& t : Tensors(config, exp_avg_sq)) {
    views.push_back({t.name + ".exp_avg_sq", t.shape, t.data->data()});
  }
  return WriteSafetensors(path, views, {{"step", absl::StrCat(step)}, {"optimizer", "adamw"}});
}

absl::Status LoadOptimizerState(const std::string& path, const ModelConfig& config,
                                ModelParams* exp_avg, ModelParams* exp_avg_sq, int64_t* step) {
  ASSIGN_OR_RETURN(SafetensorsFile st, ReadSafetensors(path));
  auto it = st.metadata.find("step");
  int64_t s = -1;
  if (it == st.metadata.end() || !absl::SimpleAtoi(it->second, &s) || s < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata \"step\" is missing or not a non-negative integer"));
  }
  ModelParams m = AllocateParams<float>(config), v = AllocateParams<float>(config);
  RETURN_IF_ERROR(CopyTensors(path, st, config, ".exp_avg", &m));
  RETURN_IF_ERROR(CopyTensors(path, st, config, ".exp_avg_sq", &v));
  *exp_avg = std::move(m);
  *exp_avg_sq = std::move(v);
  *step = s;
  return absl::OkStatus();
}

}  // namespace lumen::engine
