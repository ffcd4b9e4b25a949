#include "client/generate.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tokenizer.h"
#include "client/tokenizer_info.h"
#include "common/status_macros.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/generate.h"
#include "worker/engine/model.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

// The checkpoint's tokenizer from lumen_tokenizer.json. A checkpoint without one and with a
// 256-token vocabulary is taken to be byte-level.
absl::StatusOr<std::unique_ptr<Tokenizer>> CheckpointTokenizer(
    const fs::path& dir, const engine::ModelConfig& config) {
  const fs::path file = dir / kCheckpointTokenizerInfo;
  std::unique_ptr<Tokenizer> tokenizer;
  std::error_code ec;
  if (fs::exists(file, ec)) {
    ASSIGN_OR_RETURN(TokenizerInfo info, ReadTokenizerInfo(file.string()));
    ASSIGN_OR_RETURN(tokenizer, LoadTokenizer(info));
  } else if (config.vocab_size == 256) {
    tokenizer = MakeByteTokenizer();
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat(dir.string(), " has no ", kCheckpointTokenizerInfo, " and vocab_size ",
                     config.vocab_size, " is not the byte tokenizer's 256"));
  }
  if (tokenizer->vocab_size() > config.vocab_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        file.string(), ": the tokenizer's ", tokenizer->vocab_size(),
        " tokens do not fit the model's vocab_size ", config.vocab_size));
  }
  return tokenizer;
}

}  // namespace

absl::StatusOr<std::string> Generate(const GenerateOptions& options) {
  const fs::path dir = options.checkpoint;
  ASSIGN_OR_RETURN(engine::ModelConfig config,
                   engine::ReadHfConfig((dir / engine::kConfigFile).string()));
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, CheckpointTokenizer(dir, config));
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

  ASSIGN_OR_RETURN(std::vector<int32_t> tokens, tokenizer->Encode(options.prompt));
  if (tokens.empty()) return absl::InvalidArgumentError("--prompt encodes to no tokens");
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
  return tokenizer->Decode(tokens);
}

}  // namespace lumen
