// Tokenizers for `lumenctl data prepare` and `lumenctl generate`: byte-level and SentencePiece,
// plus SentencePiece training. A Tokenizer is immutable after loading and safe to use from
// several threads.
#ifndef LUMEN_CLIENT_TOKENIZER_H_
#define LUMEN_CLIENT_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/tokenizer_info.h"

namespace lumen {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids are in [0, vocab_size()).
  virtual int64_t vocab_size() const = 0;
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const = 0;
  // Ids outside the vocabulary decode to a replacement ("?" or SentencePiece's unknown mark).
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
};

// Every byte is a token (vocabulary 256).
std::unique_ptr<Tokenizer> MakeByteTokenizer();

// A SentencePiece model file. Text is encoded line by line: each line with the model, and the
// newline as the byte-fallback piece <0x0A> (dropped when the model has none), so that
// decoding gives the lines back (after the model's normalization, which by default folds runs
// of spaces). NOT_FOUND / INVALID_ARGUMENT naming `model_path` when it cannot be loaded.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSpmTokenizer(const std::string& model_path);

// The tokenizer `info` describes (its `model` path must be absolute or relative to the cwd).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const TokenizerInfo& info);

struct SpmTrainOptions {
  // A text file; one sentence per line (lines over 4192 bytes are skipped by SentencePiece).
  std::string input;
  int64_t vocab_size = 8000;
  // "unigram" (SentencePiece's default, trains faster on few cores) or "bpe".
  std::string model_type = "unigram";
  // Lines sampled for training at most; more lines cost time and memory for little gain.
  int64_t max_sentences = 2000000;
  // 0 = every core.
  int num_threads = 0;
};

// Smallest vocabulary TrainSpm accepts: <unk>, <s>, </s>, the 256 byte-fallback pieces and
// at least one more piece.
inline constexpr int64_t kMinSpmVocab = 260;

// Trains a SentencePiece model with byte fallback and returns the serialized .model bytes.
// Prints what it is doing to `progress` (may be null), including a heartbeat every 10 s.
// INVALID_ARGUMENT naming --train-spm for a vocabulary out of range or one SentencePiece
// cannot fill from the text.
absl::StatusOr<std::string> TrainSpm(const SpmTrainOptions& options, std::ostream* progress);

}  // namespace lumen

#endif  // LUMEN_CLIENT_TOKENIZER_H_
