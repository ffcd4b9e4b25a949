#include "client/tokenizer.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <future>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "client/spm_bridge.h"
#include "common/status_macros.h"

namespace lumen {
namespace {

class ByteTokenizer : public Tokenizer {
 public:
  int64_t vocab_size() const override { return 256; }
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(c);
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    text.reserve(ids.size());
    for (int32_t t : ids) text.push_back(t >= 0 && t < 256 ? static_cast<char>(t) : '?');
    return text;
  }
};

// SentencePiece's status, converted at the boundary.
absl::Status FromSpm(const spm_bridge::Error& e, const std::string& context) {
  if (e.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(e.code),
                      absl::StrCat(context, ": ", e.message));
}

class SpmTokenizer : public Tokenizer {
 public:
  SpmTokenizer(std::unique_ptr<spm_bridge::SpmModel> sp, std::string path)
      : sp_(std::move(sp)), path_(std::move(path)) {
    const int nl = sp_->PieceToId("<0x0A>");
    newline_ = nl != sp_->unk_id() ? nl : -1;
  }

  int64_t vocab_size() const override { return sp_->size(); }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    std::vector<int> line_ids;
    size_t begin = 0;
    while (true) {
      const size_t end = std::min(text.find('\n', begin), text.size());
      if (end > begin) {
        spm_bridge::Error e = sp_->Encode(std::string(text.substr(begin, end - begin)), &line_ids);
        if (!e.ok()) return FromSpm(e, absl::StrCat("encoding with ", path_));
        ids.insert(ids.end(), line_ids.begin(), line_ids.end());
      }
      if (end == text.size()) break;
      if (newline_ >= 0) ids.push_back(newline_);
      begin = end + 1;
    }
    return ids;
  }

  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    std::vector<int> line;
    auto flush = [&] {
      std::string piece;
      if (!sp_->Decode(line, &piece).ok()) piece = "?";
      text += piece;
      line.clear();
    };
    for (int32_t id : ids) {
      if (id == newline_) {
        flush();
        text.push_back('\n');
      } else {
        line.push_back(id >= 0 && id < sp_->size() ? id : sp_->unk_id());
      }
    }
    flush();
    return text;
  }

 private:
  const std::unique_ptr<spm_bridge::SpmModel> sp_;
  const std::string path_;
  int newline_ = -1;  // the <0x0A> piece, or -1
};

absl::StatusOr<const spm_bridge::Api*> Bridge() {
  std::string error;
  const spm_bridge::Api* api = spm_bridge::LoadApi(&error);
  if (api == nullptr) return absl::FailedPreconditionError(error);
  return api;
}

absl::Status CheckTrainOptions(const SpmTrainOptions& options) {
  if (options.vocab_size < kMinSpmVocab || options.vocab_size > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--train-spm ", options.vocab_size, ": the vocabulary must be between ", kMinSpmVocab,
        " (<unk>, <s>, </s>, 256 byte-fallback pieces and one more) and ", int64_t{1} << 24));
  }
  if (options.model_type != "unigram" && options.model_type != "bpe") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--spm-type ", options.model_type, ": expected unigram or bpe"));
  }
  std::error_code ec;
  if (!std::filesystem::is_regular_file(options.input, ec)) {
    return absl::NotFoundError(absl::StrCat("cannot read --input ", options.input));
  }
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Tokenizer> MakeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSpmTokenizer(const std::string& model_path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec)) {
    return absl::NotFoundError(absl::StrCat("SentencePiece model ", model_path,
                                            ": no such file"));
  }
  ASSIGN_OR_RETURN(const spm_bridge::Api* api, Bridge());
  std::unique_ptr<spm_bridge::SpmModel> sp(api->new_model());
  spm_bridge::Error e = sp->Load(model_path);
  if (!e.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model ", model_path,
                                                   " cannot be loaded: ", e.message));
  }
  return std::unique_ptr<Tokenizer>(std::make_unique<SpmTokenizer>(std::move(sp), model_path));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const TokenizerInfo& info) {
  if (info.type == "spm") return LoadSpmTokenizer(info.model);
  return MakeByteTokenizer();
}

absl::StatusOr<std::string> TrainSpm(const SpmTrainOptions& options, std::ostream* progress) {
  if (auto s = CheckTrainOptions(options); !s.ok()) return s;
  ASSIGN_OR_RETURN(const spm_bridge::Api* api, Bridge());
  const int threads = options.num_threads > 0
                          ? options.num_threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::unordered_map<std::string, std::string> args = {
      {"input", options.input},
      {"model_type", options.model_type},
      {"vocab_size", absl::StrCat(options.vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", "0.9999"},
      {"input_sentence_size", absl::StrCat(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", absl::StrCat(threads)},
      {"minloglevel", "2"},  // SentencePiece's own log is long; the heartbeat replaces it.
  };
  const auto start = std::chrono::steady_clock::now();
  std::string model;
  std::future<spm_bridge::Error> done =
      std::async(std::launch::async, [&] { return api->train(args, &model); });
  while (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    if (progress == nullptr) continue;
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(
        std::chrono::steady_clock::now() - start);
    *progress << "  still training the SentencePiece model (" << secs.count() << " s)"
              << std::endl;
  }
  const spm_bridge::Error e = done.get();
  if (!e.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--train-spm ", options.vocab_size, " on --input ", options.input, ": SentencePiece: ",
        e.message));
  }
  return model;
}

}  // namespace lumen
