#include "memstore/host_arena.h"

#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

TEST(HostArenaTest, AllocatesAlignedExtentsAndCoalescesOnFree) {
  auto arena = HostArena::Create(1 << 20, "test");
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto a = (*arena)->Allocate(100);
  auto b = (*arena)->Allocate(5000);
  auto c = (*arena)->Allocate(4096);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a % HostArena::kAlignment, 0);
  EXPECT_EQ(*b % HostArena::kAlignment, 0);
  EXPECT_EQ((*arena)->Stats().used_bytes, 4096 + 8192 + 4096);
  ASSERT_TRUE((*arena)->Free(*b).ok());
  EXPECT_GT((*arena)->Stats().fragmentation, 0.0);
  ASSERT_TRUE((*arena)->Free(*a).ok());
  ASSERT_TRUE((*arena)->Free(*c).ok());
  const ArenaStats stats = (*arena)->Stats();
  EXPECT_EQ(stats.used_bytes, 0);
  EXPECT_EQ(stats.free_extents, 1);
  EXPECT_EQ(stats.largest_free_bytes, 1 << 20);
  EXPECT_DOUBLE_EQ(stats.fragmentation, 0.0);
}

TEST(HostArenaTest, FullArenaNamesTheSizes) {
  auto arena = HostArena::Create(64 << 10, "test");
  ASSERT_TRUE(arena.ok());
  ASSERT_TRUE((*arena)->Allocate(60 << 10).ok());
  auto more = (*arena)->Allocate(8 << 10);
  ASSERT_EQ(more.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(more.status().message()),
              HasSubstr("host tier full: 8192 bytes requested, 4096 of 65536 bytes free"));
  EXPECT_EQ((*arena)->Free(12345).code(), absl::StatusCode::kInvalidArgument);
}

TEST(HostArenaTest, RandomAllocFreeKeepsAccounting) {
  auto arena = HostArena::Create(4 << 20, "test");
  ASSERT_TRUE(arena.ok());
  std::mt19937_64 rng(7);
  std::vector<int64_t> live;
  for (int i = 0; i < 2000; ++i) {
    if (!live.empty() && rng() % 2) {
      const size_t k = rng() % live.size();
      ASSERT_TRUE((*arena)->Free(live[k]).ok());
      live.erase(live.begin() + k);
    } else {
      auto off = (*arena)->Allocate(1 + rng() % 40000);
      if (off.ok()) live.push_back(*off);
    }
  }
  for (int64_t off : live) ASSERT_TRUE((*arena)->Free(off).ok());
  EXPECT_EQ((*arena)->Stats().used_bytes, 0);
  EXPECT_EQ((*arena)->Stats().free_extents, 1);
}

}  // namespace
}  // namespace lumen
