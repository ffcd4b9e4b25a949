#include "client/data_prepare.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "client/tokenizer.h"
#include "client/tokenizer_info.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

std::string Tmp(const std::string& name) {
  return std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/" + name;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// About 60 KB of sentences over a small vocabulary: enough for a 330-piece SentencePiece model.
std::string SmallText() {
  const std::vector<std::string> words = {
      "And",   "the",   "LORD",  "said",  "unto",   "Moses", "behold", "land",
      "of",    "Egypt", "thou",  "shalt", "not",    "go",    "people", "Israel",
      "came",  "day",   "night", "water", "bread,", "king;", "city:",  "house."};
  std::mt19937 rng(7);
  std::string text;
  for (int line = 0; line < 1200; ++line) {
    const int n = 4 + static_cast<int>(rng() % 12);
    for (int w = 0; w < n; ++w) {
      if (w > 0) text += ' ';
      text += words[rng() % words.size()];
    }
    text += '\n';
    if (line % 100 == 99) text += '\n';  // blank lines survive too
  }
  return text;
}

std::vector<int32_t> ReadUint16(const std::string& path) {
  const std::string bytes = ReadAll(path);
  std::vector<int32_t> ids(bytes.size() / 2);
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<unsigned char>(bytes[2 * i]) |
             (static_cast<unsigned char>(bytes[2 * i + 1]) << 8);
  }
  return ids;
}

TEST(DataPrepareTest, ByteTokenizerWritesUint16TokensAndSidecar) {
  const std::string text = "Hi\xff\n";
  std::ofstream(Tmp("in.txt"), std::ios::binary) << text;
  DataPrepareOptions options;
  options.input = Tmp("in.txt");
  options.output = Tmp("out.bin");
  options.tokenizer = "byte";
  auto result = PrepareData(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens, 4);
  EXPECT_EQ(result->dtype, "uint16");
  const std::string bytes = ReadAll(Tmp("out.bin"));
  EXPECT_EQ(bytes, std::string("H\0i\0\xff\0\n\0", 8));
  auto info = ReadTokenizerInfo(Tmp("out.bin.tokenizer.json"));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->type, "byte");
  EXPECT_EQ(info->vocab_size, 256);
  EXPECT_EQ(info->token_dtype, "uint16");
}

TEST(DataPrepareTest, TrainsSentencePieceEncodesAndDecodesBack) {
  const std::string text = SmallText();
  std::ofstream(Tmp("spm.txt"), std::ios::binary) << text;
  std::stringstream progress;
  DataPrepareOptions options;
  options.input = Tmp("spm.txt");
  options.output = Tmp("spm.bin");
  options.train_spm_vocab = 330;
  options.progress = &progress;
  auto result = PrepareData(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->vocab_size, 330);
  EXPECT_EQ(result->dtype, "uint16");
  EXPECT_EQ(result->spm_model, fs::absolute(Tmp("spm.bin.spm.model")).string());
  EXPECT_NE(progress.str().find("training a unigram SentencePiece model"), std::string::npos);

  auto info = ReadTokenizerInfo(Tmp("spm.bin.tokenizer.json"));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->type, "spm");
  EXPECT_EQ(info->model, result->spm_model);
  EXPECT_EQ(info->vocab_size, 330);

  const std::vector<int32_t> ids = ReadUint16(Tmp("spm.bin"));
  EXPECT_EQ(static_cast<int64_t>(ids.size()), result->tokens);
  EXPECT_LT(ids.size(), text.size() / 2);  // pieces are longer than bytes
  auto tokenizer = LoadTokenizer(*info);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->Decode(ids), text);

  // Encoding with the model file gives the same tokens.
  DataPrepareOptions again;
  again.input = Tmp("spm.txt");
  again.output = Tmp("spm2.bin");
  again.tokenizer = "spm:" + result->spm_model;
  ASSERT_TRUE(PrepareData(again).ok());
  EXPECT_EQ(ReadUint16(Tmp("spm2.bin")), ids);
  EXPECT_FALSE(fs::exists(Tmp("spm2.bin.spm.model")));
}

TEST(DataPrepareTest, BadModelPathNamesTheFileAndWritesNothing) {
  std::ofstream(Tmp("in3.txt")) << "some text\n";
  DataPrepareOptions options;
  options.input = Tmp("in3.txt");
  options.output = Tmp("none.bin");
  options.tokenizer = "spm:" + Tmp("missing.model");
  const absl::Status status = PrepareData(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find(Tmp("missing.model")), absl::string_view::npos) << status;
  EXPECT_FALSE(fs::exists(Tmp("none.bin")));
  EXPECT_FALSE(fs::exists(Tmp("none.bin.tokenizer.json")));

  std::ofstream(Tmp("garbage.model")) << "not a model";
  options.tokenizer = "spm:" + Tmp("garbage.model");
  const absl::Status garbage = PrepareData(options).status();
  EXPECT_EQ(garbage.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(garbage.message().find("garbage.model"), absl::string_view::npos) << garbage;
}

TEST(DataPrepareTest, VocabularyTooSmallOrTooLargeIsRejected) {
  std::ofstream(Tmp("in4.txt")) << SmallText();
  DataPrepareOptions options;
  options.input = Tmp("in4.txt");
  options.output = Tmp("v.bin");
  options.train_spm_vocab = 100;
  const absl::Status small = PrepareData(options).status();
  EXPECT_EQ(small.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.message().find("--train-spm 100"), absl::string_view::npos) << small;
  EXPECT_NE(small.message().find("260"), absl::string_view::npos) << small;

  // More pieces than the text can fill: SentencePiece's error, converted, and no files left.
  options.train_spm_vocab = 20000;
  const absl::Status large = PrepareData(options).status();
  EXPECT_EQ(large.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(large.message().find("--train-spm 20000"), absl::string_view::npos) << large;
  for (const auto& entry : fs::directory_iterator(fs::path(Tmp("v.bin")).parent_path())) {
    EXPECT_EQ(entry.path().filename().string().rfind("v.bin", 0), std::string::npos)
        << entry.path();
  }
}

TEST(DataPrepareTest, FlagErrorsNameTheFlag) {
  DataPrepareOptions missing;
  missing.input = Tmp("nope.txt");
  missing.output = Tmp("x.bin");
  EXPECT_NE(PrepareData(missing).status().message().find("--input " + Tmp("nope.txt")),
            absl::string_view::npos);
  std::ofstream(Tmp("in2.txt")) << "abc";
  DataPrepareOptions bad;
  bad.input = Tmp("in2.txt");
  bad.output = Tmp("y.bin");
  bad.tokenizer = "bpe";
  EXPECT_EQ(PrepareData(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(PrepareData(bad).status().message().find("--tokenizer bpe"), absl::string_view::npos);
  DataPrepareOptions both = bad;
  both.tokenizer = "byte";
  both.train_spm_vocab = 500;
  EXPECT_NE(PrepareData(both).status().message().find("--train-spm 500"),
            absl::string_view::npos);
  DataPrepareOptions type = bad;
  type.tokenizer = "";
  type.train_spm_vocab = 500;
  type.spm_type = "char";
  EXPECT_NE(PrepareData(type).status().message().find("--spm-type char"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace lumen
