#include "common/profile_cache.h"

#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace lumen {
namespace {

TEST(ProfileCacheTest, MeasuresOnceThenReadsTheCache) {
  const std::string dir = std::string(getenv("TEST_TMPDIR")) + "/node";
  std::filesystem::remove_all(dir);
  int runs = 0;
  auto measure = [&]() -> absl::StatusOr<ProfileFigures> {
    ++runs;
    return ProfileFigures{{"gemm_flops", 1.5e11}, {"copy_bytes_per_s", 5e9}};
  };
  auto first = CachedProfile(dir, "worker-0", false, measure);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = CachedProfile(dir, "worker-0", false, measure);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(runs, 1);
  EXPECT_DOUBLE_EQ(second->at("gemm_flops"), 1.5e11);
  EXPECT_GT(second->at("measured_unix_s"), 1.7e9);
  ASSERT_TRUE(CachedProfile(dir, "worker-0", true, measure).ok());
  EXPECT_EQ(runs, 2);
  // A damaged cache is measured again, never trusted.
  std::ofstream(dir + "/profile/worker-0.json") << "{\"gemm_flops\": \"fast\"}";
  ASSERT_TRUE(CachedProfile(dir, "worker-0", false, measure).ok());
  EXPECT_EQ(runs, 3);
  auto failing = []() -> absl::StatusOr<ProfileFigures> {
    return absl::InternalError("no device");
  };
  EXPECT_EQ(CachedProfile(dir, "worker-1", false, failing).status().code(),
            absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace lumen
