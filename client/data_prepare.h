// `lumenctl data prepare`: text -> token file (DESIGN §7) plus a sidecar naming the tokenizer.
#ifndef LUMEN_CLIENT_DATA_PREPARE_H_
#define LUMEN_CLIENT_DATA_PREPARE_H_

#include <cstdint>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"

namespace lumen {

struct DataPrepareOptions {
  std::string input;
  std::string output;
  // "byte" (every byte is a token, vocabulary 256) or "spm:MODEL" (an existing SentencePiece
  // .model file). Empty means byte, or the trained model with train_spm_vocab.
  std::string tokenizer;
  // > 0: train a SentencePiece model with this vocabulary on `input` first, write it to
  // `output`.spm.model and encode with it. Cannot be combined with `tokenizer`.
  int64_t train_spm_vocab = 0;
  // "unigram" or "bpe", for train_spm_vocab.
  std::string spm_type = "unigram";
  // Where to say what is happening (training, encoding progress); may be null.
  std::ostream* progress = nullptr;
};

struct DataPrepareResult {
  int64_t tokens = 0;
  int64_t vocab_size = 0;
  // "uint16" when vocab_size <= 65536, else "uint32"; the job's data.token_dtype must match.
  std::string dtype;
  // The trained or given SentencePiece model (absolute), empty for byte.
  std::string spm_model;
};

// Writes `output`, `output`.tokenizer.json (read by the worker, copied into checkpoints and
// used by `lumenctl generate` to decode) and, when training, `output`.spm.model. Every file is
// written under a temporary name and renamed at the end, so a failure leaves no partial file.
// Errors name the flag or file at fault.
absl::StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& options);

}  // namespace lumen

#endif  // LUMEN_CLIENT_DATA_PREPARE_H_
