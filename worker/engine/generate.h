// Autoregressive sampling from a Llama model with a per-layer KV cache.
// Thread-safety: Generate only reads `params`; concurrent calls with distinct pools are safe.
#ifndef LUMEN_WORKER_ENGINE_GENERATE_H_
#define LUMEN_WORKER_ENGINE_GENERATE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/model.h"
#include "worker/engine/thread_pool.h"

namespace lumen::engine {

struct GenerateOptions {
  // New tokens to produce at most (fewer if stop_token is produced).
  int64_t max_tokens = 64;
  // 0 = greedy (argmax, lowest id on ties); otherwise logits are divided by it.
  double temperature = 1.0;
  // Keep only the k most likely tokens before sampling (ties broken by lower id); 0 = all.
  int64_t top_k = 0;
  // Seeds a std::mt19937_64; a draw u = (x >> 11) * 2^-53 picks the first token whose
  // cumulative probability (ascending id order over the kept set) exceeds u.
  uint64_t seed = 0;
  // Stop after producing this token; -1 = never.
  int64_t stop_token = -1;
};

// Returns the new tokens (not including the prompt). INVALID_ARGUMENT for an empty prompt,
// ids outside [0, vocab), or prompt + max_tokens > max_position_embeddings.
absl::StatusOr<std::vector<int32_t>> Generate(const ModelConfig& config, const ModelParams& params,
                                              const std::vector<int32_t>& prompt,
                                              const GenerateOptions& options,
                                              ThreadPool* pool = nullptr);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_GENERATE_H_
