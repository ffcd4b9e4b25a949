// Hugging Face checkpoint export/import (config.json + model.safetensors that transformers loads
// as LlamaForCausalLM) and AdamW state files. Free functions; thread-safe for distinct paths.
#ifndef LUMEN_WORKER_ENGINE_CHECKPOINT_H_
#define LUMEN_WORKER_ENGINE_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/model.h"
#include "worker/engine/safetensors.h"

namespace lumen::engine {

inline constexpr char kConfigFile[] = "config.json";
inline constexpr char kModelFile[] = "model.safetensors";
inline constexpr char kOptimizerFile[] = "optimizer.safetensors";
inline constexpr char kModelIndexFile[] = "model.safetensors.index.json";

// Hugging Face's save_pretrained(max_shard_size="2GB"): transformers parses "GB" as 10^9
// bytes ("GiB" would be 2^30), so 2 GB is 2,000,000,000 bytes of tensor data per shard.
inline constexpr int64_t kDefaultMaxShardBytes = 2'000'000'000;

// The config.json text for `config` (architectures LlamaForCausalLM, torch_dtype float32).
std::string HfConfigJson(const ModelConfig& config);

// Parses a Hugging Face config.json (the fields of ModelConfig; init_std keeps its default).
// INVALID_ARGUMENT naming the file and field when a required field is missing or mistyped.
absl::StatusOr<ModelConfig> ReadHfConfig(const std::string& path);

// Creates `dir` if needed and writes config.json and the weights (F32, HF names, metadata
// format=pt) as Hugging Face's save_pretrained does: one model.safetensors when the tensor data
// totals <= max_shard_bytes, else shards model-00001-of-0000N.safetensors ... (tensors in
// NamedTensors order; a shard is closed when the next tensor would take it past
// max_shard_bytes, and a tensor larger than max_shard_bytes gets a shard of its own) plus
// model.safetensors.index.json {"metadata": {"total_size": bytes of tensor data},
// "weight_map": {tensor name: shard file}}. Files are replaced atomically one by one; weight
// files of the other layout left by an earlier export are removed once the new layout is
// complete. INVALID_ARGUMENT for max_shard_bytes <= 0.
absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const ModelParams& params,
                               int64_t max_shard_bytes = kDefaultMaxShardBytes);

// Provides tensor `name` (a Hugging Face name, shaped as NamedTensors gives it) into `dst`.
using TensorSource = std::function<absl::Status(const std::string& name, float* dst)>;

// As above, each tensor taken from `source` when its turn to be written comes: one tensor in
// memory at a time, for state that lives elsewhere (a device, the memstore). A source's error
// is returned as it is, and the file being written is removed.
absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const TensorSource& source,
                               int64_t max_shard_bytes = kDefaultMaxShardBytes);

// Loads weights from a safetensors file, or from a directory holding model.safetensors or
// (when that is absent, as transformers does) model.safetensors.index.json and its shards.
// Every tensor of `config` must be present with the right shape (INVALID_ARGUMENT naming the
// tensor and both shapes otherwise); with tied embeddings a stored lm_head.weight is ignored.
// A malformed index, a tensor missing from its weight_map, or a shard that lacks a tensor the
// index places there is INVALID_ARGUMENT naming the index or shard file and the tensor; a
// missing shard file is NOT_FOUND naming it. F32, BF16 and F16 are accepted. `params` is
// unchanged on error.
absl::Status LoadWeights(const std::string& path, const ModelConfig& config, ModelParams* params);

// The same files opened to read one tensor at a time (mapped, not read whole), for state that
// goes elsewhere (a device, the memstore) as it is read. Open makes every check LoadWeights
// makes, with the same errors, before anything is read. Thread-compatible.
class WeightsReader : public WeightsSource {
 public:
  static absl::StatusOr<std::unique_ptr<WeightsReader>> Open(const std::string& path,
                                                             const ModelConfig& config);
  // Tensor `name` (a Hugging Face name of the model) into a buffer of its size, in any order.
  absl::Status Read(const std::string& name, float* dst) override;

 private:
  WeightsReader() = default;
  std::vector<std::unique_ptr<SafetensorsReader>> files_;
  std::map<std::string, const SafetensorsReader*> file_of_;
};

// AdamW state: tensors "<name>.exp_avg" and "<name>.exp_avg_sq" for every parameter, and
// metadata "step" (number of updates done).
absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const ModelParams& exp_avg, const ModelParams& exp_avg_sq,
                                int64_t step);
// As above, each moment taken from its source when its turn comes.
absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const TensorSource& exp_avg, const TensorSource& exp_avg_sq,
                                int64_t step);
absl::Status LoadOptimizerState(const std::string& path, const ModelConfig& config,
                                ModelParams* exp_avg, ModelParams* exp_avg_sq, int64_t* step);

// An optimizer state file opened to read one parameter's moments at a time (the file is 8
// bytes per parameter; it is mapped, not read whole). Open checks the step metadata and that
// every moment of `config` is present with its parameter's shape (INVALID_ARGUMENT naming the
// file and tensor). Thread-compatible.
class OptimizerStateReader {
 public:
  static absl::StatusOr<std::unique_ptr<OptimizerStateReader>> Open(const std::string& path,
                                                                     const ModelConfig& config);
  // Updates done when the state was saved.
  int64_t step() const { return step_; }
  // The moments of parameter `name` (a Hugging Face name) into buffers of its size.
  absl::Status Read(const std::string& name, float* exp_avg, float* exp_avg_sq) const;

 private:
  OptimizerStateReader() = default;
  std::unique_ptr<SafetensorsReader> file_;
  int64_t step_ = 0;
};

// The step of an optimizer state file for `config`, reading its header only.
absl::StatusOr<int64_t> OptimizerStateStep(const std::string& path, const ModelConfig& config);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_CHECKPOINT_H_
