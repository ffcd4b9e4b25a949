// `lumenctl generate`: loads an exported checkpoint directory and samples a continuation.
#ifndef LUMEN_CLIENT_GENERATE_H_
#define LUMEN_CLIENT_GENERATE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace lumen {

struct GenerateOptions {
  // A directory with config.json and model.safetensors, and lumen_tokenizer.json (byte or
  // SentencePiece; without it the model must have the byte tokenizer's 256 tokens).
  std::string checkpoint;
  std::string prompt;
  int64_t max_tokens = 200;
  // 0 = greedy.
  double temperature = 0.8;
  // 0 = sample from the whole vocabulary.
  int64_t top_k = 40;
  uint64_t seed = 1;
  // Kernel threads; 0 = every core.
  int num_threads = 0;
};

// Encodes the prompt with the checkpoint's tokenizer and returns the decoded prompt followed by
// the generated text. When prompt plus output would exceed the
// model's max_position_embeddings, the context slides: generation continues from the last half
// window of tokens. Errors name the checkpoint file at fault.
absl::StatusOr<std::string> Generate(const GenerateOptions& options);

}  // namespace lumen

#endif  // LUMEN_CLIENT_GENERATE_H_
