#include "client/tokenizer_info.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "gtest/gtest.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

std::string Tmp(const std::string& name) {
  return std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/" + name;
}

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(TokenizerInfoTest, DtypeFollowsTheVocabulary) {
  EXPECT_EQ(TokenDtypeForVocab(256), "uint16");
  EXPECT_EQ(TokenDtypeForVocab(65536), "uint16");
  EXPECT_EQ(TokenDtypeForVocab(65537), "uint32");
}

TEST(TokenizerInfoTest, NoSidecarMeansNoTokenizer) {
  auto files = ReadTokenizerFiles(Tmp("plain.bin"));
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_FALSE(files->has_value());
}

TEST(TokenizerInfoTest, MissingModelNamesSidecarAndModel) {
  TokenizerInfo info;
  info.type = "spm";
  info.model = Tmp("gone.model");
  info.vocab_size = 8000;
  std::ofstream(Tmp("gone.bin.tokenizer.json")) << TokenizerInfoJson(info);
  const absl::Status status = ReadTokenizerFiles(Tmp("gone.bin")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("gone.bin.tokenizer.json"), absl::string_view::npos);
  EXPECT_NE(status.message().find("gone.model"), absl::string_view::npos);
}

TEST(TokenizerInfoTest, MalformedSidecarNamesTheField) {
  std::ofstream(Tmp("bad.json")) << R"({"type": "wordpiece", "vocab_size": 10})";
  const absl::Status status = ReadTokenizerInfo(Tmp("bad.json")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("\"type\""), absl::string_view::npos) << status;
  std::ofstream(Tmp("bad2.json")) << R"({"type": "spm", "vocab_size": 10})";
  EXPECT_NE(ReadTokenizerInfo(Tmp("bad2.json")).status().message().find("\"model\""),
            absl::string_view::npos);
}

TEST(TokenizerInfoTest, CheckpointGetsModelConfigAndRelativeInfo) {
  std::ofstream(Tmp("m.model"), std::ios::binary) << std::string("\x0a\x01model-bytes", 13);
  TokenizerInfo info;
  info.type = "spm";
  info.model = Tmp("m.model");
  info.vocab_size = 8000;
  std::ofstream(Tmp("train.bin.tokenizer.json")) << TokenizerInfoJson(info);
  auto files = ReadTokenizerFiles(Tmp("train.bin"));
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_TRUE(files->has_value());

  const fs::path dir = Tmp("ckpt");
  fs::create_directories(dir);
  ASSERT_TRUE(WriteCheckpointTokenizer(**files, dir.string(), 512).ok());
  EXPECT_EQ(ReadAll(dir / "tokenizer.model"), std::string("\x0a\x01model-bytes", 13));
  const std::string config = ReadAll(dir / "tokenizer_config.json");
  EXPECT_NE(config.find("\"tokenizer_class\": \"LlamaTokenizer\""), std::string::npos);
  EXPECT_NE(config.find("\"add_bos_token\": false"), std::string::npos);
  EXPECT_NE(config.find("\"model_max_length\": 512"), std::string::npos);
  EXPECT_NE(ReadAll(dir / "lumen_tokenizer.json").find("\"model\": \"tokenizer.model\""),
            std::string::npos);
  auto copied = ReadTokenizerInfo((dir / "lumen_tokenizer.json").string());
  ASSERT_TRUE(copied.ok()) << copied.status();
  EXPECT_EQ(copied->model, (fs::absolute(dir) / "tokenizer.model").string());
  EXPECT_EQ(copied->vocab_size, 8000);
}

TEST(TokenizerInfoTest, ByteCheckpointGetsOnlyTheInfo) {
  TokenizerFiles files;  // byte
  const fs::path dir = Tmp("ckpt-byte");
  fs::create_directories(dir);
  ASSERT_TRUE(WriteCheckpointTokenizer(files, dir.string(), 128).ok());
  EXPECT_TRUE(fs::exists(dir / "lumen_tokenizer.json"));
  EXPECT_FALSE(fs::exists(dir / "tokenizer.model"));
  EXPECT_FALSE(fs::exists(dir / "tokenizer_config.json"));
}

}  // namespace
}  // namespace lumen
