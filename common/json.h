// A minimal JSON reader/writer for safetensors headers and Hugging Face config.json.
// Values are plain data (thread-compatible); parsing never crashes on malformed input.
#ifndef LUMEN_COMMON_JSON_H_
#define LUMEN_COMMON_JSON_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace lumen {

struct JsonValue {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  std::string text;  // string value, or the literal text of a number
  std::vector<JsonValue> array;
  std::vector<std::pair<std::string, JsonValue>> object;  // in file order

  // Member `key` of an object, or nullptr (also when this is not an object).
  const JsonValue* Find(std::string_view key) const;
  // True (and sets *out) when this is a number that is an integer fitting in int64_t.
  bool AsInt64(int64_t* out) const;
};

// Parses one JSON document. INVALID_ARGUMENT with the byte offset of the problem on error.
// Nesting deeper than 64 levels is rejected.
absl::StatusOr<JsonValue> ParseJson(std::string_view text);

// `s` as a quoted JSON string with escapes.
std::string JsonQuote(std::string_view s);

}  // namespace lumen

#endif  // LUMEN_COMMON_JSON_H_
