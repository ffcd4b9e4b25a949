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

// The config.json text for `config` (architectures LlamaForCausalLM, torch_dtype float32).
std::string HfConfigJson(const ModelConfig& config);

// Parses a Hugging Face config.json (the fields of ModelConfig; init_std keeps its default).
// INVALID_ARGUMENT naming the file and field when a required field is missing or mistyped.
absl::StatusOr<ModelConfig> ReadHfConfig(const std::string& path);

// Creates `dir` if needed and writes config.json and model.safetensors (F32, HF names,
// metadata format=pt). Files are replaced atomically one by one.
absl::Status ExportHfDirectory(const std::string& dir, const ModelConfig& config,
                               const ModelParams& params);

// Loads weights from a safetensors file, or from a directory holding model.safetensors. Every
// tensor of `config` must be present with the right shape (INVALID_ARGUMENT naming the tensor
// and both shapes otherwise); with tied embeddings a stored lm_head.weight is ignored. F32,
// BF16 and F16 are accepted. `params` is unchanged on error.
absl::Status LoadWeights(const std::string& path, const ModelConfig& config, ModelParams* params);

// AdamW state: tensors "<name>.exp_avg" and "<name>.exp_avg_sq" for every parameter, and
// metadata "step" (number of updates done).
absl::Status SaveOptimizerState(const std::string& path, const ModelConfig& config,
                                const ModelParams& exp_avg, const ModelParams& exp_avg_sq,
                                int64_t step);
absl::Status LoadOptimizerState(const std::string& path, const ModelConfig& config,
                                ModelParams* exp_avg, ModelParams* exp_avg_sq, int64_t* step);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_CHECKPOINT_H_
