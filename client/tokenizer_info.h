// The tokenizer description that travels with token files and checkpoints: the sidecar
// `FILE.bin.tokenizer.json` written by `lumenctl data prepare`, and `lumen_tokenizer.json` in a
// checkpoint directory. Plain data and free functions; thread-safe.
#ifndef LUMEN_CLIENT_TOKENIZER_INFO_H_
#define LUMEN_CLIENT_TOKENIZER_INFO_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace lumen {

inline constexpr char kTokenizerSidecarSuffix[] = ".tokenizer.json";
// File names inside a checkpoint directory. tokenizer.model and tokenizer_config.json are the
// names Hugging Face's LlamaTokenizer loads.
inline constexpr char kCheckpointTokenizerInfo[] = "lumen_tokenizer.json";
inline constexpr char kCheckpointSpmModel[] = "tokenizer.model";
inline constexpr char kCheckpointTokenizerConfig[] = "tokenizer_config.json";

struct TokenizerInfo {
  // "byte" (every byte is a token, vocabulary 256) or "spm" (SentencePiece).
  std::string type = "byte";
  // spm only: the .model file. Absolute in a sidecar; relative to the JSON file's directory
  // (kCheckpointSpmModel) in a checkpoint.
  std::string model;
  int64_t vocab_size = 256;
  // "uint16" or "uint32": how the token file stores ids.
  std::string token_dtype = "uint16";
};

// The sidecar path for a token file.
std::string TokenizerSidecarPath(const std::string& token_file);

// The JSON text of `info` (one line).
std::string TokenizerInfoJson(const TokenizerInfo& info);

// Reads and checks a tokenizer JSON file. NOT_FOUND when it does not exist; INVALID_ARGUMENT
// naming the file and field when it is malformed. A relative `model` is made absolute against
// the file's directory.
absl::StatusOr<TokenizerInfo> ReadTokenizerInfo(const std::string& path);

// "uint16" when every id fits (vocab_size <= 65536), else "uint32".
std::string TokenDtypeForVocab(int64_t vocab_size);

// A token file's tokenizer, read once (the worker reads it when a job starts, so every
// checkpoint of the job carries the same tokenizer even if the files change meanwhile).
struct TokenizerFiles {
  TokenizerInfo info;
  // spm only: the bytes of the .model file.
  std::string spm_model;
};

// The tokenizer of `token_file` from its sidecar. nullopt when there is no sidecar (a token
// file made by other tools); an error naming the file when the sidecar or the .model it names
// cannot be read.
absl::StatusOr<std::optional<TokenizerFiles>> ReadTokenizerFiles(const std::string& token_file);

// Writes the tokenizer into a checkpoint directory: lumen_tokenizer.json, and for spm also
// tokenizer.model (lumen_tokenizer.json points at it, relative) and a minimal
// tokenizer_config.json for Hugging Face's LlamaTokenizer. The caller renames `dir` into place
// when complete, so files are written directly.
absl::Status WriteCheckpointTokenizer(const TokenizerFiles& files, const std::string& dir,
                                      int64_t max_position_embeddings);

}  // namespace lumen

#endif  // LUMEN_CLIENT_TOKENIZER_INFO_H_
