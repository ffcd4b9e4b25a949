#include "coordinator/planner/hardware_profile.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

constexpr char kMinimal[] = R"(name: t
device:
  count: 2
  memory: 8GiB
  peak_bf16_tflops: 100
  peak_fp32_tflops: 50
  memory_bandwidth_gb_per_s: 500
  link_peak_gb_per_s: 20
  link_efficiency: 0.5
host:
  memory: 64GB
  memory_peak_gb_per_s: 50
  cpu_optimizer_params_per_s: 1e9
)";

TEST(HardwareProfileTest, ParsesUnitsAndDefaults) {
  auto hw = ParseHardwareProfile(kMinimal, "t.yaml");
  ASSERT_TRUE(hw.ok()) << hw.status();
  EXPECT_EQ(hw->device.count, 2);
  EXPECT_EQ(hw->device.memory_bytes, int64_t{8} << 30);
  EXPECT_DOUBLE_EQ(hw->device.peak_bf16_flops, 100e12);
  EXPECT_DOUBLE_EQ(hw->device.LinkBandwidth(), 10e9);
  EXPECT_EQ(hw->host.memory_bytes, 64'000'000'000);
  EXPECT_EQ(hw->nvme.drives, 0);  // nvme is optional
}

TEST(HardwareProfileTest, UnknownFieldIsNamedWithLine) {
  std::string yaml = kMinimal;
  yaml.replace(yaml.find("  memory: 8GiB"), 14, "  memmory: 8GiB");
  auto hw = ParseHardwareProfile(yaml, "t.yaml");
  ASSERT_EQ(hw.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(hw.status().message(), HasSubstr("t.yaml: device.memmory (line 4): unknown field"));
  EXPECT_THAT(hw.status().message(), HasSubstr("known fields: kind, count, memory"));
}

TEST(HardwareProfileTest, BadValueAndMissingFieldAreNamed) {
  std::string yaml = kMinimal;
  yaml.replace(yaml.find("link_efficiency: 0.5"), 20, "link_efficiency: 1.5");
  auto hw = ParseHardwareProfile(yaml, "t.yaml");
  EXPECT_THAT(std::string(hw.status().message()),
              HasSubstr("device.link_efficiency (line 9): '1.5' is not a fraction in (0, 1]"));

  yaml = kMinimal;
  yaml.replace(yaml.find("  memory: 8GiB"), 14, "  memory: lots");
  EXPECT_THAT(std::string(ParseHardwareProfile(yaml, "t.yaml").status().message()),
              HasSubstr("device.memory (line 4): 'lots' is not a positive byte count"));

  yaml = kMinimal;
  yaml.erase(yaml.find("  cpu_optimizer_params_per_s: 1e9\n"));
  EXPECT_THAT(ParseHardwareProfile(yaml, "t.yaml").status().message(),
              HasSubstr("t.yaml: host.cpu_optimizer_params_per_s is required"));

  EXPECT_THAT(ParseHardwareProfile("name: [", "t.yaml").status().message(),
              HasSubstr("t.yaml: not valid YAML"));
}

TEST(HardwareProfileTest, BuiltinProfilesMatchTheFilesAndParse) {
  for (const std::string name : {"8x-rtx4090", "1x-rtx4090", "1x-h100"}) {
    auto builtin = LoadHardwareProfile(name);
    ASSERT_TRUE(builtin.ok()) << builtin.status();
    auto file = LoadHardwareProfile("deploy/hardware/" + name + ".yaml");
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ(builtin->name, name);
    EXPECT_EQ(file->device.memory_bytes, builtin->device.memory_bytes);
    EXPECT_EQ(file->source, "deploy/hardware/" + name + ".yaml");
  }
  auto node = LoadHardwareProfile("8x-rtx4090");
  EXPECT_EQ(node->device.count, 8);
  EXPECT_EQ(node->host.memory_bytes, 512'000'000'000);
  EXPECT_EQ(node->nvme.drives, 4);
  EXPECT_NEAR(node->device.LinkBandwidth(), 25.2e9, 1e8);
  EXPECT_NEAR(node->nvme.read_per_drive * 4, 28e9, 1);
  EXPECT_NEAR(node->nvme.write_per_drive * 4, 20e9, 1);
}

TEST(HardwareProfileTest, UnknownNameListsBuiltins) {
  auto hw = LoadHardwareProfile("2x-toaster");
  EXPECT_EQ(hw.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(hw.status().message(), HasSubstr("1x-h100, 1x-rtx4090, 8x-rtx4090"));
}

}  // namespace
}  // namespace lumen
