#include "client/generate.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/generate.h"
#include "worker/engine/model.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

// The checkpoint's tokenizer. Only the byte tokenizer exists so far; a checkpoint without a
// lumen_tokenizer.json and a 256-token vocabulary is taken to be byte-level.
absl::Status CheckByteTokenizer(const fs::path& dir, const engine::ModelConfig& config) {
  const fs::path file = dir / "lumen_tokenizer.json";
  std::ifstream in(file);
  if (in) {
    std::stringstream text;
    text << in.rdbuf();
    if (text.str().find("\"byte\"") == std::string::npos) {
      return absl::UnimplementedError(
          absl::StrCat(file.string(), ": only the byte tokenizer can decode so far"));
    }
  } else if (config.vocab_size != 256) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir.string(), " has no lumen_tokenizer.json and vocab_size ",
                     config.vocab_size, " is not the byte tokenizer's 256"));
  }
  if (config.vocab_size < 256) {
    return absl::FailedPreconditionError(absl::StrCat(
        "vocab_size ", config.vocab_size, " is smaller than the byte tokenizer's 256"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> Generate(const GenerateOptions& options) {
  const fs::path dir = options.checkpoint;
  ASSIGN_OR_RETURN(engine::ModelConfig config,
                   engine::ReadHfConfig((dir / engine::kConfigFile).string()));
  RETURN_IF_ERROR(CheckByteTokenizer(dir, config));
  engine::ModelParams params = engine::AllocateParams<float>(config);
  RETURN_IF_ERROR(engine::LoadWeights(dir.string(), config, &params));
  if (options.prompt.empty()) return absl::InvalidArgumentError("--prompt is empty");
  if (options.max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--max-tokens ", options.max_tokens,
                                                   " must not be negative"));
  }
  const int threads = options.num_threads > 0
                          ? options.num_threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  engine::ThreadPool pool(threads);

  std::vector<int32_t> tokens;
  for (unsigned char c : options.prompt) tokens.push_back(c);
  const int64_t window = config.max_position_embeddings;
  int64_t remaining = options.max_tokens;
  uint64_t seed = options.seed;
  while (remaining > 0) {
    const int64_t keep = std::min<int64_t>(tokens.size(), std::max<int64_t>(1, window / 2));
    std::vector<int32_t> context(tokens.end() - keep, tokens.end());
    engine::GenerateOptions g;
    g.max_tokens = std::min<int64_t>(remaining, window - keep);
    g.temperature = options.temperature;
    g.top_k = options.top_k;
    g.seed = seed++;
    ASSIGN_OR_RETURN(std::vector<int32_t> produced,
                     engine::Generate(config, params, context, g, &pool));
    if (produced.empty()) break;
    tokens.insert(tokens.end(), produced.begin(), produced.end());
    remaining -= produced.size();
  }
  std::string text;
  for (int32_t t : tokens) text.push_back(static_cast<char>(t < 256 ? t : '?'));
  return text;
}

}  // namespace lumen
