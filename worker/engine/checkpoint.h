// Hugging Face checkpoint export/import (config.json + model.safetensors that transformers loads
// as LlamaForCausalLM) and AdamW state files. Free functions; thread-safe for distinct paths.
#ifndef LUMEN_WORKER_ENGINE_CHECKPOINT_H_
#define LUMEN_WORKER_ENGINE_CHECKPOINT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/model.h"

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

// Loads weights from a safetensors file, or from a directory holding model.safetensors or
// (when that is absent, as transformers does) model.safetensors.index.json and its shards.
// Every tensor of `config` must be present with the right shape (INVALID_ARGUMENT naming the
// tensor and both shapes otherwise); with tied embeddings a stored lm_head.weight is ignored.
// A malformed index, a tensor missing from its weight_map, or a shard that lacks a tensor the
// index places there is INVALID_ARGUMENT naming the index or shard file and the tensor; a
// missing shard file is NOT_FOUND naming it. F32, BF16 and F16 are accepted. `params` is
// unchanged on error.
absl::Status LoadWeights(const std::string& path, const ModelConfig& config, ModelParams* params);

// AdamW state: tensors "<name>.exp_avg" and "<name>.exp_avg_sq" for every parameter, and
// metadata "step" (number of updates done).
absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const ModelParams& exp_avg, const ModelParams& exp_avg_sq,
                                int64_t step);
absl::Status LoadOptimizerState(const std::string& path, const ModelConfig& config,
                                ModelParams* exp_avg, ModelParams* exp_avg_sq, int64_t* step);
// The "step" of an optimizer state file, from its header alone (no tensors are read).
absl::StatusOr<int64_t> OptimizerStateStep(const std::string& path);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_CHECKPOINT_H_
