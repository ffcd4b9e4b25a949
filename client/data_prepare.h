// `lumenctl data prepare`: text -> token file (DESIGN §7) plus a sidecar naming the tokenizer.
#ifndef LUMEN_CLIENT_DATA_PREPARE_H_
#define LUMEN_CLIENT_DATA_PREPARE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace lumen {

struct DataPrepareOptions {
  std::string input;
  std::string output;
  // "byte": every byte of the text is a token (vocabulary 256), stored as uint16.
  std::string tokenizer = "byte";
};

struct DataPrepareResult {
  int64_t tokens = 0;
  int64_t vocab_size = 0;
  std::string dtype;
};

// Writes `output` and `output`.tokenizer.json (read by the worker, copied into checkpoints and
// used by `lumenctl generate` to decode). Both are written to temporary names and renamed, so
// a failure leaves no partial file.
absl::StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& options);

}  // namespace lumen

#endif  // LUMEN_CLIENT_DATA_PREPARE_H_
