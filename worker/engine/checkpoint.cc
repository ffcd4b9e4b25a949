#include "worker/engine/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/json.h"
#include "worker/engine/safetensors.h"

namespace lumen::engine {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::vector<NamedTensor<float>> Tensors(const ModelConfig& c, const ModelParams& p) {
  return NamedTensors(c, const_cast<ModelParams*>(&p));
}

// The names and shapes of `config`'s tensors, without data (null data pointers).
std::vector<NamedTensor<float>> Shapes(const ModelConfig& config) {
  ModelParams empty;
  empty.layers.resize(config.num_hidden_layers);
  std::vector<NamedTensor<float>> shapes = NamedTensors(config, &empty);
  for (NamedTensor<float>& t : shapes) t.data = nullptr;
  return shapes;
}

// The safetensors views of `config`'s tensors (names with `suffix`), their data in `params`
// or, when it is null, taken from `source` one tensor at a time.
std::vector<TensorView> HfViews(const ModelConfig& config, const std::string& suffix,
                                const ModelParams* params, const TensorSource* source) {
  std::vector<NamedTensor<float>> tensors =
      params != nullptr ? Tensors(config, *params) : Shapes(config);
  std::vector<TensorView> views;
  for (const NamedTensor<float>& t : tensors) {
    TensorView v;
    v.name = t.name + suffix;
    v.shape = t.shape;
    if (params != nullptr) {
      v.data = t.data->data();
    } else {
      v.fill = [source, name = t.name](float* dst) { return (*source)(name, dst); };
    }
    views.push_back(std::move(v));
  }
  return views;
}

// Checks that `file` holds each of `tensors` (names with `suffix`) with the model's shape;
// `where` is appended to a missing tensor's error.
absl::Status CheckTensors(const SafetensorsReader& file, const std::string& suffix,
                          const std::vector<NamedTensor<float>>& tensors,
                          const std::string& where = "") {
  for (const NamedTensor<float>& t : tensors) {
    const std::string name = t.name + suffix;
    const std::vector<int64_t>* shape = file.shape(name);
    if (shape == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor ", name, " (shape ",
                                                     ShapeString(t.shape), ") is missing",
                                                     where));
    }
    if (*shape != t.shape) {
      return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor ", name,
                                                     " has shape ", ShapeString(*shape),
                                                     ", the model needs ", ShapeString(t.shape)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadText(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text;
  char buf[4096];
  size_t r;
  while ((r = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, r);
  const bool error = std::ferror(f) != 0;
  std::fclose(f);
  if (error) return absl::DataLossError(absl::StrCat("read error on ", path));
  return text;
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

namespace {

absl::Status ExportViews(const std::string& dir, const ModelConfig& config,
                         std::vector<TensorView> views, int64_t max_shard_bytes) {
  if (max_shard_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("export to ", dir, ": max_shard_bytes ", max_shard_bytes, " must be > 0"));
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create directory ", dir, ": ", ec.message()));
  }
  // Split into shards exactly like huggingface_hub's split_state_dict_into_shards.
  std::vector<std::vector<TensorView>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (TensorView& t : views) {
    int64_t bytes = sizeof(float);
    for (int64_t d : t.shape) bytes *= d;
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(std::move(t));
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const std::string index_path = dir + "/" + kModelIndexFile;
  const std::string single_path = dir + "/" + kModelFile;
  // Removes the weight files of the layout not written now (a stale index or
  // model.safetensors would shadow or contradict the new files).
  auto remove_stale = [&](const std::set<std::string>& keep) -> absl::Status {
    std::error_code dir_ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, dir_ec)) {
      const std::string name = entry.path().filename().string();
      const bool weights = name == kModelFile || name == kModelIndexFile ||
                           (absl::StartsWith(name, "model-") &&
                            absl::EndsWith(name, ".safetensors") &&
                            absl::StrContains(name, "-of-"));
      if (!weights || keep.count(name) != 0) continue;
      std::error_code rm_ec;
      std::filesystem::remove(entry.path(), rm_ec);
      if (rm_ec) {
        return absl::PermissionDeniedError(absl::StrCat("cannot remove stale weight file ",
                                                        entry.path().string(), ": ",
                                                        rm_ec.message()));
      }
    }
    if (dir_ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot list directory ", dir, ": ", dir_ec.message()));
    }
    return absl::OkStatus();
  };
  if (shards.size() == 1) {
    RETURN_IF_ERROR(WriteSafetensors(single_path, shards[0], metadata));
    RETURN_IF_ERROR(remove_stale({kModelFile}));
  } else {
    const int n = static_cast<int>(shards.size());
    std::set<std::string> files = {kModelIndexFile};
    std::string weight_map;
    std::map<std::string, std::string> sorted_map;  // HF writes the map with sorted keys
    for (int i = 0; i < n; ++i) {
      const std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, n);
      RETURN_IF_ERROR(WriteSafetensors(dir + "/" + file, shards[i], metadata));
      files.insert(file);
      for (const TensorView& v : shards[i]) sorted_map[v.name] = file;
    }
    for (const auto& [name, file] : sorted_map) {
      absl::StrAppend(&weight_map, weight_map.empty() ? "" : ",\n", "    ", JsonQuote(name),
                      ": ", JsonQuote(file));
    }
    RETURN_IF_ERROR(WriteText(index_path, absl::StrCat("{\n  \"metadata\": {\n    \"total_size\": ",
                                                       total_bytes, "\n  },\n  \"weight_map\": {\n",
                                                       weight_map, "\n  }\n}\n")));
    RETURN_IF_ERROR(remove_stale(files));
  }
  return WriteText(dir + "/" + kConfigFile, HfConfigJson(config));
}

}  // namespace

absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const ModelParams& params, int64_t max_shard_bytes) {
  return ExportViews(dir, config, HfViews(config, "", &params, nullptr), max_shard_bytes);
}

absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const TensorSource& source, int64_t max_shard_bytes) {
  return ExportViews(dir, config, HfViews(config, "", nullptr, &source), max_shard_bytes);
}

absl::StatusOr<std::unique_ptr<WeightsReader>> WeightsReader::Open(const std::string& path,
                                                                   const ModelConfig& config) {
  std::unique_ptr<WeightsReader> r(new WeightsReader());
  const std::vector<NamedTensor<float>> shapes = Shapes(config);
  std::error_code ec;
  if (!std::filesystem::is_directory(path, ec) ||
      std::filesystem::exists(path + "/" + kModelFile, ec)) {
    const std::string file =
        std::filesystem::is_directory(path, ec) ? path + "/" + kModelFile : path;
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> reader, SafetensorsReader::Open(file));
    RETURN_IF_ERROR(CheckTensors(*reader, "", shapes));
    for (const NamedTensor<float>& t : shapes) r->file_of_[t.name] = reader.get();
    r->files_.push_back(std::move(reader));
    return r;
  }
  const std::string index_path = path + "/" + kModelIndexFile;
  if (!std::filesystem::exists(index_path, ec)) {
    return absl::NotFoundError(absl::StrCat("directory ", path, " holds neither ", kModelFile,
                                            " nor ", kModelIndexFile));
  }
  ASSIGN_OR_RETURN(const std::string text, ReadText(index_path));
  auto json = ParseJson(text);
  if (!json.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", json.status().message()));
  }
  const JsonValue* map = json->Find("weight_map");
  if (map == nullptr || map->type != JsonValue::Type::kObject) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": \"weight_map\" is missing or not an object"));
  }
  // Group the tensors the model needs by shard, then open and check one shard at a time.
  std::map<std::string, std::vector<NamedTensor<float>>> by_file;
  for (const NamedTensor<float>& t : shapes) {
    const JsonValue* file = map->Find(t.name);
    if (file == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map has no entry for "
                                                     "tensor ", t.name, " (shape ",
                                                     ShapeString(t.shape), ")"));
    }
    if (file->type != JsonValue::Type::kString || file->text.empty() ||
        file->text.find('/') != std::string::npos || file->text == "." || file->text == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": weight_map entry of tensor ", t.name,
                       " is not a file name in the directory"));
    }
    by_file[file->text].push_back(t);
  }
  for (auto& [file, tensors] : by_file) {
    const std::string shard_path = path + "/" + file;
    auto reader = SafetensorsReader::Open(shard_path);
    if (!reader.ok()) {
      return absl::Status(reader.status().code(),
                          absl::StrCat(reader.status().message(), " (", index_path,
                                       " places tensor ", tensors[0].name, " there)"));
    }
    RETURN_IF_ERROR(CheckTensors(**reader, "", tensors,
                                absl::StrCat(" (", index_path, " places it in this shard)")));
    for (const NamedTensor<float>& t : tensors) r->file_of_[t.name] = reader->get();
    r->files_.push_back(*std::move(reader));
  }
  return r;
}

absl::Status WeightsReader::Read(const std::string& name, float* dst) {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    return absl::NotFoundError(absl::StrCat("the model has no tensor ", name));
  }
  return it->second->Read(name, dst);
}

absl::Status LoadWeights(const std::string& path, const ModelConfig& config,
                         ModelParams* params) {
  ASSIGN_OR_RETURN(std::unique_ptr<WeightsReader> reader, WeightsReader::Open(path, config));
  ModelParams loaded = AllocateParams<float>(config);
  for (const NamedTensor<float>& t : NamedTensors(config, &loaded)) {
    RETURN_IF_ERROR(reader->Read(t.name, t.data->data()));
  }
  *params = std::move(loaded);
  return absl::OkStatus();
}

namespace {

absl::Status SaveMoments(const std::string& path, std::vector<TensorView> views,
                         std::vector<TensorView> sq_views, int64_t step) {
  for (TensorView& v : sq_views) views.push_back(std::move(v));
  return WriteSafetensors(path, views, {{"step", absl::StrCat(step)}, {"optimizer", "adamw"}});
}

}  // namespace

absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const TensorSource& exp_avg, const TensorSource& exp_avg_sq,
                                int64_t step) {
  return SaveMoments(path, HfViews(config, ".exp_avg", nullptr, &exp_avg),
                     HfViews(config, ".exp_avg_sq", nullptr, &exp_avg_sq), step);
}

absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const ModelParams& exp_avg, const ModelParams& exp_avg_sq,
                                int64_t step) {
  return SaveMoments(path, HfViews(config, ".exp_avg", &exp_avg, nullptr),
                     HfViews(config, ".exp_avg_sq", &exp_avg_sq, nullptr), step);
}

absl::StatusOr<std::unique_ptr<OptimizerStateReader>> OptimizerStateReader::Open(
    const std::string& path, const ModelConfig& config) {
  std::unique_ptr<OptimizerStateReader> r(new OptimizerStateReader());
  ASSIGN_OR_RETURN(r->file_, SafetensorsReader::Open(path));
  const auto& metadata = r->file_->metadata();
  auto it = metadata.find("step");
  if (it == metadata.end() || !absl::SimpleAtoi(it->second, &r->step_) || r->step_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata \"step\" is missing or not a non-negative integer"));
  }
  const std::vector<NamedTensor<float>> shapes = Shapes(config);
  RETURN_IF_ERROR(CheckTensors(*r->file_, ".exp_avg", shapes));
  RETURN_IF_ERROR(CheckTensors(*r->file_, ".exp_avg_sq", shapes));
  return r;
}

absl::Status OptimizerStateReader::Read(const std::string& name, float* exp_avg,
                                        float* exp_avg_sq) const {
  RETURN_IF_ERROR(file_->Read(name + ".exp_avg", exp_avg));
  return file_->Read(name + ".exp_avg_sq", exp_avg_sq);
}

absl::StatusOr<int64_t> OptimizerStateStep(const std::string& path, const ModelConfig& config) {
  ASSIGN_OR_RETURN(std::unique_ptr<OptimizerStateReader> r, OptimizerStateReader::Open(path, config));
  return r->step();
}

absl::Status LoadOptimizerState(const std::string& path, const ModelConfig& config,
                                ModelParams* exp_avg, ModelParams* exp_avg_sq, int64_t* step) {
  ASSIGN_OR_RETURN(std::unique_ptr<OptimizerStateReader> r, OptimizerStateReader::Open(path, config));
  ModelParams m = AllocateParams<float>(config), v = AllocateParams<float>(config);
  std::vector<NamedTensor<float>> vs = NamedTensors(config, &v);
  std::vector<NamedTensor<float>> ms = NamedTensors(config, &m);
  for (size_t i = 0; i < ms.size(); ++i) {
    RETURN_IF_ERROR(r->Read(ms[i].name, ms[i].data->data(), vs[i].data->data()));
  }
  *exp_avg = std::move(m);
  *exp_avg_sq = std::move(v);
  *step = r->step();
  return absl::OkStatus();
}

}  // namespace lumen::engine
