#include "worker/engine/data.h"

#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/test_util.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

std::string WriteBytes(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = TempPath(name);
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  return path;
}

std::string WriteU16(const std::string& name, const std::vector<uint16_t>& toks) {
  std::vector<uint8_t> b;
  for (uint16_t t : toks) {
    b.push_back(t & 0xff);
    b.push_back(t >> 8);
  }
  return WriteBytes(name, b);
}

TEST(DataTest, SequentialWindowsFollowTheFormula) {
  const int64_t n = 50, t = 4, a = 2, bsz = 3;
  std::vector<uint16_t> toks(n);
  for (int64_t i = 0; i < n; ++i) toks[i] = static_cast<uint16_t>(1000 + i);
  DataConfig cfg;
  cfg.path = WriteU16("seq.bin", toks);
  auto ds = TokenDataset::Open(cfg, t, 2000);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->num_tokens(), n);
  std::vector<int32_t> in(bsz * t), tg(bsz * t);
  for (int64_t s = 0; s < 5; ++s) {
    for (int64_t m = 0; m < a; ++m) {
      ASSERT_TRUE((*ds)->ReadBatch(s, m, a, bsz, in.data(), tg.data()).ok());
      for (int64_t b = 0; b < bsz; ++b) {
        const int64_t start = ((s * a + m) * bsz + b) * t % (n - t - 1);
        for (int64_t j = 0; j < t; ++j) {
          EXPECT_EQ(in[b * t + j], 1000 + start + j);
          EXPECT_EQ(tg[b * t + j], 1000 + start + j + 1);
        }
      }
    }
  }
  // A hand-checked case: step 3, micro 1, sample 2 -> ((3*2+1)*3+2)*4 = 92 mod 45 = 2.
  ASSERT_TRUE((*ds)->ReadBatch(3, 1, a, bsz, in.data(), tg.data()).ok());
  EXPECT_EQ(in[2 * t], 1002);
}

TEST(DataTest, Uint32LittleEndian) {
  std::vector<uint8_t> b;
  for (uint32_t i = 0; i < 10; ++i) {
    const uint32_t v = 70000 + i;
    for (int k = 0; k < 4; ++k) b.push_back((v >> (8 * k)) & 0xff);
  }
  DataConfig cfg;
  cfg.path = WriteBytes("u32.bin", b);
  cfg.token_dtype = TokenDtype::kUint32;
  auto ds = TokenDataset::Open(cfg, 3, 100000);
  ASSERT_TRUE(ds.ok()) << ds.status();
  std::vector<int32_t> in(3), tg(3);
  ASSERT_TRUE((*ds)->ReadBatch(1, 0, 1, 1, in.data(), tg.data()).ok());
  EXPECT_EQ(in[0], 70003);
  EXPECT_EQ(tg[2], 70006);
}

TEST(DataTest, ShuffledIsAPermutationOfWindowsAndDeterministic) {
  const int64_t n = 103, t = 5;  // K = (103 - 6) / 5 + 1 = 20 windows
  std::vector<uint16_t> toks(n);
  for (int64_t i = 0; i < n; ++i) toks[i] = static_cast<uint16_t>(i);
  DataConfig cfg;
  cfg.path = WriteU16("shuf.bin", toks);
  cfg.order = DataOrder::kShuffled;
  cfg.seed = 9;
  auto a = TokenDataset::Open(cfg, t, 1000);
  auto b = TokenDataset::Open(cfg, t, 1000);
  ASSERT_TRUE(a.ok() && b.ok());
  std::set<int64_t> epoch0, epoch1;
  std::vector<int64_t> order0;
  for (int64_t i = 0; i < 20; ++i) {
    const int64_t s = (*a)->WindowStart(i);
    EXPECT_EQ(s % t, 0);
    EXPECT_LE(s + t + 1, n);
    epoch0.insert(s);
    order0.push_back(s);
  }
  for (int64_t i = 20; i < 40; ++i) epoch1.insert((*a)->WindowStart(i));
  EXPECT_EQ(epoch0.size(), 20u);
  EXPECT_EQ(epoch1.size(), 20u);
  for (int64_t i = 0; i < 20; ++i) EXPECT_EQ((*b)->WindowStart(i), order0[i]);
  bool identity = true;
  for (int64_t i = 0; i < 20; ++i) identity = identity && order0[i] == i * t;
  EXPECT_FALSE(identity);
}

TEST(DataTest, UniformBelowIsInRangeAndPortable) {
  std::mt19937_64 rng(1);
  const uint64_t first = std::mt19937_64(1)();
  EXPECT_EQ(UniformBelow(rng, 10), first % 10);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(UniformBelow(rng, 7), 7u);
  EXPECT_EQ(UniformBelow(rng, 1), 0u);
}

TEST(DataTest, OddByteCountIsRejected) {
  DataConfig cfg;
  cfg.path = WriteBytes("odd.bin", std::vector<uint8_t>(101, 1));
  auto ds = TokenDataset::Open(cfg, 4, 100);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("101 bytes, not a multiple of 2"));
  cfg.token_dtype = TokenDtype::kUint32;
  cfg.path = WriteBytes("odd32.bin", std::vector<uint8_t>(102, 1));
  ds = TokenDataset::Open(cfg, 4, 100);
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("not a multiple of 4"));
}

TEST(DataTest, TooShortAndMissingFiles) {
  DataConfig cfg;
  cfg.path = WriteU16("short.bin", std::vector<uint16_t>(5, 1));
  auto ds = TokenDataset::Open(cfg, 4, 100);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("has 5 tokens"));
  cfg.path = TempPath("does-not-exist.bin");
  ds = TokenDataset::Open(cfg, 4, 100);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("does-not-exist.bin"));
}

TEST(DataTest, TokenOutOfVocabNamesFileOffsetAndToken) {
  std::vector<uint16_t> toks(30, 3);
  toks[13] = 500;
  DataConfig cfg;
  cfg.path = WriteU16("oov.bin", toks);
  auto ds = TokenDataset::Open(cfg, 4, 100);
  ASSERT_TRUE(ds.ok());
  std::vector<int32_t> in(4), tg(4);
  EXPECT_TRUE((*ds)->ReadBatch(0, 0, 1, 1, in.data(), tg.data()).ok());  // window [0,5) is fine
  absl::Status s = (*ds)->ReadBatch(3, 0, 1, 1, in.data(), tg.data());   // window [12,17)
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("oov.bin"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("token 500 at token offset 13"));
}

}  // namespace
}  // namespace lumen::engine
