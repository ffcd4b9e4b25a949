#include "client/data_prepare.h"

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lumen {
namespace {

std::string Tmp(const std::string& name) {
  return std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/" + name;
}

TEST(DataPrepareTest, ByteTokenizerWritesUint16TokensAndSidecar) {
  const std::string text = "Hi\xff\n";
  std::ofstream(Tmp("in.txt"), std::ios::binary) << text;
  DataPrepareOptions options{Tmp("in.txt"), Tmp("out.bin"), "byte"};
  auto result = PrepareData(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens, 4);
  std::ifstream in(Tmp("out.bin"), std::ios::binary);
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes, (std::vector<unsigned char>{'H', 0, 'i', 0, 0xff, 0, '\n', 0}));
  std::ifstream sidecar(Tmp("out.bin.tokenizer.json"));
  std::string json((std::istreambuf_iterator<char>(sidecar)), std::istreambuf_iterator<char>());
  EXPECT_NE(json.find("\"byte\""), std::string::npos);
}

TEST(DataPrepareTest, ErrorsNameTheInput) {
  DataPrepareOptions missing{Tmp("nope.txt"), Tmp("x.bin"), "byte"};
  EXPECT_NE(PrepareData(missing).status().message().find("nope.txt"), absl::string_view::npos);
  std::ofstream(Tmp("in2.txt")) << "abc";
  DataPrepareOptions bad{Tmp("in2.txt"), Tmp("y.bin"), "bpe"};
  EXPECT_EQ(PrepareData(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(PrepareData(bad).status().message().find("--tokenizer bpe"), absl::string_view::npos);
}

}  // namespace
}  // namespace lumen
