#include "common/units.h"

#include <cstdint>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

TEST(ParseBytesTest, PlainNumbersAreBytes) {
  EXPECT_EQ(*ParseBytes("0"), 0);
  EXPECT_EQ(*ParseBytes("4096"), 4096);
  EXPECT_EQ(*ParseBytes(" 4096 "), 4096);
  EXPECT_EQ(*ParseBytes("17B"), 17);
}

TEST(ParseBytesTest, BinaryUnits) {
  EXPECT_EQ(*ParseBytes("1KiB"), 1024);
  EXPECT_EQ(*ParseBytes("64MiB"), 64 * 1024 * 1024);
  EXPECT_EQ(*ParseBytes("1GiB"), int64_t{1} << 30);
  EXPECT_EQ(*ParseBytes("2TiB"), int64_t{2} << 40);
  EXPECT_EQ(*ParseBytes("1.5GiB"), int64_t{3} << 29);
  EXPECT_EQ(*ParseBytes("64 mib"), 64 * 1024 * 1024);
}

TEST(ParseBytesTest, DecimalUnits) {
  EXPECT_EQ(*ParseBytes("1KB"), 1000);
  EXPECT_EQ(*ParseBytes("512MB"), 512000000);
  EXPECT_EQ(*ParseBytes("3GB"), 3000000000);
  EXPECT_EQ(*ParseBytes("2TB"), 2000000000000);
  EXPECT_EQ(*ParseBytes("0.5KB"), 500);
}

TEST(ParseBytesTest, FractionsRoundToNearestByte) {
  EXPECT_EQ(*ParseBytes("1.5"), 2);
  EXPECT_EQ(*ParseBytes(".5KiB"), 512);
}

TEST(ParseBytesTest, ErrorsNameTheText) {
  for (const char* bad : {"", "abc", "12XB", "-1", "1.2.3GiB", "MiB", "1 GiB extra"}) {
    absl::StatusOr<int64_t> r = ParseBytes(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr(std::string("\"") + bad + "\"")) << bad;
  }
  EXPECT_THAT(ParseBytes("-1").status().message(), HasSubstr("negative"));
  EXPECT_THAT(ParseBytes("12XB").status().message(), HasSubstr("unknown unit \"xb\""));
}

TEST(ParseBytesTest, Overflow) {
  EXPECT_EQ(*ParseBytes("9223372036854775807"), std::numeric_limits<int64_t>::max());
  EXPECT_THAT(ParseBytes("9223372036854775808").status().message(), HasSubstr("too large"));
  EXPECT_THAT(ParseBytes("8388608TiB").status().message(), HasSubstr("too large"));
  EXPECT_THAT(ParseBytes("8388608.0TiB").status().message(), HasSubstr("too large"));
  EXPECT_EQ(*ParseBytes("8388607TiB"), int64_t{8388607} << 40);
}

TEST(FormatBytesTest, PicksLargestUnit) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.0 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(64 * 1024 * 1024), "64.0 MiB");
  EXPECT_EQ(FormatBytes(int64_t{3} << 29), "1.5 GiB");
  EXPECT_EQ(FormatBytes(int64_t{5} << 40), "5.0 TiB");
  EXPECT_EQ(FormatBytes(-2048), "-2.0 KiB");
  EXPECT_EQ(FormatBytes(std::numeric_limits<int64_t>::min()), "-8.0 EiB");
}

TEST(FormatBytesTest, RoundTripsThroughParse) {
  EXPECT_EQ(*ParseBytes(FormatBytes(64 * 1024 * 1024)), 64 * 1024 * 1024);
}

}  // namespace
}  // namespace lumen
