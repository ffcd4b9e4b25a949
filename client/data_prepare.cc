#include "client/data_prepare.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/tokenizer.h"
#include "client/tokenizer_info.h"
#include "common/status_macros.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

// Files written to temporary names; Commit renames them all, the destructor removes what was
// not committed.
class PendingFiles {
 public:
  ~PendingFiles() {
    for (const auto& [tmp, path] : files_) std::remove(tmp.c_str());
  }

  // Returns the temporary file's path.
  absl::StatusOr<std::string> Write(const std::string& path, const char* data, size_t size) {
    const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
    files_.emplace_back(tmp, path);
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
    out.write(data, static_cast<std::streamsize>(size));
    out.flush();
    if (!out) return absl::InternalError(absl::StrCat("writing ", tmp, " failed (disk full?)"));
    return tmp;
  }

  absl::Status Commit() {
    for (const auto& [tmp, path] : files_) {
      if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
      }
    }
    files_.clear();
    return absl::OkStatus();
  }

 private:
  std::vector<std::pair<std::string, std::string>> files_;  // (temporary, final)
};

absl::StatusOr<std::string> ReadInput(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --input ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input ", path, " holds ", text.size(), " bytes; too little"));
  }
  return text;
}

// Encodes in chunks of lines so that long inputs show progress.
absl::StatusOr<std::vector<int32_t>> EncodeWithProgress(const Tokenizer& tokenizer,
                                                        const std::string& text,
                                                        std::ostream* progress) {
  constexpr size_t kChunk = 1 << 20;
  std::vector<int32_t> ids;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = std::min(text.size(), begin + kChunk);
    if (end < text.size()) {
      const size_t nl = text.find('\n', end);
      end = nl == std::string::npos ? text.size() : nl;  // chunks end before a newline
    }
    ASSIGN_OR_RETURN(std::vector<int32_t> chunk,
                     tokenizer.Encode(std::string_view(text).substr(begin, end - begin)));
    ids.insert(ids.end(), chunk.begin(), chunk.end());
    if (end < text.size()) {  // the newline between chunks
      ASSIGN_OR_RETURN(std::vector<int32_t> nl, tokenizer.Encode("\n"));
      ids.insert(ids.end(), nl.begin(), nl.end());
      ++end;
    }
    begin = end;
    if (progress != nullptr && text.size() > kChunk) {
      *progress << "  encoded " << begin * 100 / text.size() << "% (" << ids.size()
                << " tokens)" << std::endl;
    }
  }
  return ids;
}

std::vector<char> Serialize(const std::vector<int32_t>& ids, const std::string& dtype) {
  const size_t width = dtype == "uint16" ? 2 : 4;
  std::vector<char> bytes(ids.size() * width);
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint32_t v = static_cast<uint32_t>(ids[i]);
    for (size_t b = 0; b < width; ++b) bytes[i * width + b] = static_cast<char>(v >> (8 * b));
  }
  return bytes;
}

absl::Status CheckTokenizerFlags(const DataPrepareOptions& options) {
  if (options.train_spm_vocab != 0 && !options.tokenizer.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--train-spm ", options.train_spm_vocab, " trains a tokenizer; do not also give "
        "--tokenizer ", options.tokenizer));
  }
  if (options.train_spm_vocab < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--train-spm ", options.train_spm_vocab, " must be positive"));
  }
  const std::string& t = options.tokenizer;
  if (!t.empty() && t != "byte" && !(absl::StartsWith(t, "spm:") && t.size() > 4)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tokenizer ", t, ": expected byte or spm:MODEL_FILE"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& options) {
  RETURN_IF_ERROR(CheckTokenizerFlags(options));
  std::ostream* progress = options.progress;
  ASSIGN_OR_RETURN(std::string text, ReadInput(options.input));
  PendingFiles files;
  TokenizerInfo info;     // byte unless below
  std::string load_from;  // the .model to load (a trained one before it is renamed into place)
  if (options.train_spm_vocab > 0) {
    if (progress != nullptr) {
      *progress << "training a " << options.spm_type << " SentencePiece model (vocabulary "
                << options.train_spm_vocab << ", byte fallback) on " << options.input << " ("
                << text.size() / 1024 << " KiB)" << std::endl;
    }
    SpmTrainOptions train;
    train.input = options.input;
    train.vocab_size = options.train_spm_vocab;
    train.model_type = options.spm_type;
    ASSIGN_OR_RETURN(std::string model, TrainSpm(train, progress));
    info.type = "spm";
    info.model = fs::absolute(options.output + ".spm.model").string();
    ASSIGN_OR_RETURN(load_from, files.Write(info.model, model.data(), model.size()));
  } else if (absl::StartsWith(options.tokenizer, "spm:")) {
    info.type = "spm";
    info.model = fs::absolute(options.tokenizer.substr(4)).string();
    load_from = info.model;
  }
  std::unique_ptr<Tokenizer> tokenizer;
  if (info.type == "spm") {
    auto loaded = LoadSpmTokenizer(load_from);
    if (!loaded.ok()) {
      const std::string flag = options.train_spm_vocab > 0
                                   ? absl::StrCat("--train-spm ", options.train_spm_vocab)
                                   : absl::StrCat("--tokenizer ", options.tokenizer);
      return absl::Status(loaded.status().code(),
                          absl::StrCat(flag, ": ", loaded.status().message()));
    }
    tokenizer = *std::move(loaded);
  } else {
    tokenizer = MakeByteTokenizer();
  }
  info.vocab_size = tokenizer->vocab_size();
  info.token_dtype = TokenDtypeForVocab(info.vocab_size);
  if (progress != nullptr && info.type == "spm") {
    *progress << "encoding " << options.input << " with " << info.model << " (vocabulary "
              << info.vocab_size << ", " << info.token_dtype << " tokens)" << std::endl;
  }
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, EncodeWithProgress(*tokenizer, text, progress));
  if (ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input ", options.input, " encodes to no tokens"));
  }
  const std::vector<char> bytes = Serialize(ids, info.token_dtype);
  RETURN_IF_ERROR(files.Write(options.output, bytes.data(), bytes.size()).status());
  const std::string sidecar = TokenizerInfoJson(info);
  RETURN_IF_ERROR(
      files.Write(TokenizerSidecarPath(options.output), sidecar.data(), sidecar.size())
          .status());
  RETURN_IF_ERROR(files.Commit());
  DataPrepareResult result;
  result.tokens = static_cast<int64_t>(ids.size());
  result.vocab_size = info.vocab_size;
  result.dtype = info.token_dtype;
  result.spm_model = info.model;
  return result;
}

}  // namespace lumen
