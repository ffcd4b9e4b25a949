#include "client/data_prepare.h"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lumen {
namespace {

absl::Status WriteFileAtomically(const std::string& path, const char* data, size_t size) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
    out.write(data, static_cast<std::streamsize>(size));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::InternalError(absl::StrCat("writing ", tmp, " failed (disk full?)"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& options) {
  if (options.tokenizer != "byte") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tokenizer ", options.tokenizer, ": only the byte tokenizer is available so far"));
  }
  std::ifstream in(options.input, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --input ", options.input));
  std::vector<char> text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input ", options.input, " holds ", text.size(), " bytes; too little"));
  }
  std::vector<uint8_t> tokens(text.size() * 2);  // uint16 little-endian
  for (size_t i = 0; i < text.size(); ++i) {
    tokens[2 * i] = static_cast<uint8_t>(text[i]);
    tokens[2 * i + 1] = 0;
  }
  if (auto s = WriteFileAtomically(options.output, reinterpret_cast<const char*>(tokens.data()),
                                   tokens.size());
      !s.ok()) {
    return s;
  }
  const std::string sidecar = R"({"type": "byte", "vocab_size": 256, "token_dtype": "uint16"})";
  if (auto s = WriteFileAtomically(options.output + ".tokenizer.json", sidecar.data(),
                                   sidecar.size());
      !s.ok()) {
    return s;
  }
  DataPrepareResult result;
  result.tokens = static_cast<int64_t>(text.size());
  result.vocab_size = 256;
  result.dtype = "uint16";
  return result;
}

}  // namespace lumen
