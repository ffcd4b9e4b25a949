#include "client/tokenizer_info.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/json.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

absl::Status FieldError(const std::string& path, const std::string& field,
                        const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": \"", field, "\" ", problem));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("reading ", path, " failed"));
  return text.str();
}

absl::Status WriteFile(const fs::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  out.flush();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

absl::StatusOr<std::string> StringField(const JsonValue& root, const std::string& path,
                                        const std::string& field) {
  const JsonValue* v = root.Find(field);
  if (v == nullptr || v->type != JsonValue::Type::kString) {
    return FieldError(path, field, "is missing or not a string");
  }
  return v->text;
}

}  // namespace

std::string TokenizerSidecarPath(const std::string& token_file) {
  return token_file + kTokenizerSidecarSuffix;
}

std::string TokenizerInfoJson(const TokenizerInfo& info) {
  std::string json = absl::StrCat("{\"type\": ", JsonQuote(info.type));
  if (info.type == "spm") absl::StrAppend(&json, ", \"model\": ", JsonQuote(info.model));
  absl::StrAppend(&json, ", \"vocab_size\": ", info.vocab_size,
                  ", \"token_dtype\": ", JsonQuote(info.token_dtype), "}\n");
  return json;
}

std::string TokenDtypeForVocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? "uint16" : "uint32";
}

absl::StatusOr<TokenizerInfo> ReadTokenizerInfo(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto root = ParseJson(text);
  if (!root.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", root.status().message()));
  }
  TokenizerInfo info;
  ASSIGN_OR_RETURN(info.type, StringField(*root, path, "type"));
  if (info.type != "byte" && info.type != "spm") {
    return FieldError(path, "type", absl::StrCat("is \"", info.type, "\"; expected byte or spm"));
  }
  const JsonValue* vocab = root->Find("vocab_size");
  if (vocab == nullptr || !vocab->AsInt64(&info.vocab_size) || info.vocab_size <= 0) {
    return FieldError(path, "vocab_size", "is missing or not a positive integer");
  }
  if (root->Find("token_dtype") != nullptr) {
    ASSIGN_OR_RETURN(info.token_dtype, StringField(*root, path, "token_dtype"));
    if (info.token_dtype != "uint16" && info.token_dtype != "uint32") {
      return FieldError(path, "token_dtype",
                        absl::StrCat("is \"", info.token_dtype, "\"; expected uint16 or uint32"));
    }
  }
  if (info.type == "spm") {
    ASSIGN_OR_RETURN(info.model, StringField(*root, path, "model"));
    if (info.model.empty()) return FieldError(path, "model", "is empty");
    if (fs::path(info.model).is_relative()) {
      info.model = (fs::absolute(path).parent_path() / info.model).string();
    }
  }
  return info;
}

absl::StatusOr<std::optional<TokenizerFiles>> ReadTokenizerFiles(const std::string& token_file) {
  const std::string sidecar = TokenizerSidecarPath(token_file);
  std::error_code ec;
  if (!fs::exists(sidecar, ec)) return std::nullopt;
  TokenizerFiles files;
  ASSIGN_OR_RETURN(files.info, ReadTokenizerInfo(sidecar));
  if (files.info.type == "spm") {
    auto model = ReadFile(files.info.model);
    if (!model.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          sidecar, " names the SentencePiece model ", files.info.model, ": ",
          model.status().message()));
    }
    files.spm_model = *std::move(model);
  }
  return files;
}

absl::Status WriteCheckpointTokenizer(const TokenizerFiles& files, const std::string& dir,
                                      int64_t max_position_embeddings) {
  const fs::path d = dir;
  TokenizerInfo info = files.info;
  if (info.type == "spm") {
    info.model = kCheckpointSpmModel;
    RETURN_IF_ERROR(WriteFile(d / kCheckpointSpmModel, files.spm_model));
    // Lines are encoded separately (see client/tokenizer.h); nothing is added around them.
    const std::string config = absl::StrCat(
        "{\n  \"tokenizer_class\": \"LlamaTokenizer\",\n  \"add_bos_token\": false,\n",
        "  \"add_eos_token\": false,\n  \"legacy\": true,\n",
        "  \"clean_up_tokenization_spaces\": false,\n  \"model_max_length\": ",
        max_position_embeddings, "\n}\n");
    RETURN_IF_ERROR(WriteFile(d / kCheckpointTokenizerConfig, config));
  }
  return WriteFile(d / kCheckpointTokenizerInfo, TokenizerInfoJson(info));
}

}  // namespace lumen
