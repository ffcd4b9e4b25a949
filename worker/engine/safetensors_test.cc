#include "worker/engine/safetensors.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/test_util.h"
#include "common/json.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

std::string ReadAll(const std::string& path) {
  std::string s;
  FILE* f = std::fopen(path.c_str(), "rb");
  char buf[4096];
  size_t r;
  while ((r = std::fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, r);
  std::fclose(f);
  return s;
}

void WriteAll(const std::string& path, const std::string& s) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(s.data(), 1, s.size(), f);
  std::fclose(f);
}

// A file with the given header text and data bytes.
std::string MakeFile(const std::string& name, const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  s += header + data;
  const std::string path = TempPath(name);
  WriteAll(path, s);
  return path;
}

TEST(SafetensorsTest, RoundTrip) {
  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.1f, 7.0f, -0.0f};
  std::vector<float> b = {42.0f};
  const std::string path = TempPath("rt.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w.a", {2, 3}, a.data()}, {"b\"q", {1}, b.data()}},
                               {{"format", "pt"}})
                  .ok());
  const std::string raw = ReadAll(path);
  uint64_t hl = 0;
  for (int i = 0; i < 8; ++i) hl |= static_cast<uint64_t>(static_cast<uint8_t>(raw[i])) << (8 * i);
  EXPECT_EQ(hl % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + hl + 7 * 4);
  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata.at("format"), "pt");
  ASSERT_EQ(f->tensors.size(), 2u);
  EXPECT_EQ(f->tensors.at("w.a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f->tensors.at("w.a").data, a);
  EXPECT_EQ(f->tensors.at("w.a").dtype, "F32");
  EXPECT_EQ(f->tensors.at("b\"q").data, b);
}

TEST(SafetensorsTest, ReadsBf16AndF16) {
  // bf16 0x3FC0 = 1.5, 0xC000 = -2; f16 0x3E00 = 1.5, 0x0001 = 2^-24.
  std::string data = {'\xC0', '\x3F', '\x00', '\xC0', '\x00', '\x3E', '\x01', '\x00'};
  const std::string path = MakeFile(
      "half.safetensors",
      R"({"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},)"
      R"("y":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}})",
      data);
  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->tensors.at("x").data, (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f->tensors.at("y").data, (std::vector<float>{1.5f, 5.9604644775390625e-8f}));
}

TEST(SafetensorsTest, TruncatedFiles) {
  std::vector<float> a(10, 1.0f);
  const std::string path = TempPath("trunc.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", {10}, a.data()}}).ok());
  const std::string raw = ReadAll(path);
  for (size_t cut : {size_t{0}, size_t{5}, size_t{20}, raw.size() - 1}) {
    const std::string p = TempPath("trunc2.safetensors");
    WriteAll(p, raw.substr(0, cut));
    auto f = ReadSafetensors(p);
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << cut;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("trunc2.safetensors")) << cut;
  }
  WriteAll(TempPath("t3.safetensors"), raw.substr(0, 4));
  EXPECT_THAT(std::string(ReadSafetensors(TempPath("t3.safetensors")).status().message()),
              HasSubstr("truncated"));
  WriteAll(TempPath("t4.safetensors"), raw.substr(0, raw.size() - 1));
  EXPECT_THAT(std::string(ReadSafetensors(TempPath("t4.safetensors")).status().message()),
              HasSubstr("out of range"));
}

TEST(SafetensorsTest, MalformedHeaders) {
  const std::string data(16, '\0');
  struct Case {
    std::string header;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})", "malformed JSON"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}} x)", "trailing"},
      {R"([1,2])", "not a JSON object"},
      {R"({"a":{"dtype":"F32","shape":[4]}})", "lacks dtype"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}})", "out of range"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", "needs 12 bytes"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})", "invalid data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", "invalid shape"},
      {R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", "unsupported dtype I64"},
      {R"({"a":{"dtype":"F32","shape":[1e3],"data_offsets":[0,16]}})", "invalid shape"},
      {R"({"__metadata__":{"k":1}})", "not a string"},
      {R"({"a":"\uZZZZ"})", "bad hex"},
      {std::string(100, '['), "malformed JSON"},
      {std::string(70, '[') + std::string(70, ']'), "nesting"},
  };
  for (const Case& c : cases) {
    const std::string path = MakeFile("bad.safetensors", c.header, data);
    auto f = ReadSafetensors(path);
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << c.header;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(c.message)) << c.header;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("bad.safetensors")) << c.header;
  }
  // Header length larger than the file.
  std::string s(8, '\xff');
  WriteAll(TempPath("huge.safetensors"), s + "{}");
  EXPECT_THAT(std::string(ReadSafetensors(TempPath("huge.safetensors")).status().message()),
              HasSubstr("header length"));
  EXPECT_EQ(ReadSafetensors(TempPath("missing.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(JsonTest, ParsesValuesAndEscapes) {
  auto v = ParseJson(R"( {"a": [1, -2.5e1, true, null], "s": "x\n\u00e9\ud83d\ude00", "i": 9007199254740993} )");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->Find("a")->array[1].number, -25.0);
  EXPECT_TRUE(v->Find("a")->array[2].boolean);
  EXPECT_EQ(v->Find("s")->text, "x\n\xc3\xa9\xf0\x9f\x98\x80");
  int64_t i;
  ASSERT_TRUE(v->Find("i")->AsInt64(&i));
  EXPECT_EQ(i, 9007199254740993);
  EXPECT_FALSE(v->Find("a")->array[1].AsInt64(&i));
  EXPECT_EQ(JsonQuote("a\"b\\\x01"), "\"a\\\"b\\\\\\u0001\"");
}

}  // namespace
}  // namespace lumen::engine
