#include "client/export.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "gtest/gtest.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

fs::path Tmp(const std::string& name) {
  return fs::path(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") / name;
}

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A job output directory with checkpoints at steps 100 and 20 and one being written.
fs::path MakeJobDir(const std::string& name) {
  const fs::path job = Tmp(name);
  for (const char* step : {"step-20", "step-100", ".step-200.tmp"}) {
    fs::create_directories(job / step);
    std::ofstream(job / step / "config.json") << step;
  }
  return job;
}

TEST(ExportTest, ListsCompleteCheckpointsOnly) {
  const fs::path job = MakeJobDir("list");
  EXPECT_EQ(ListCheckpointSteps(job.string()), (std::vector<int64_t>{20, 100}));
  EXPECT_TRUE(ListCheckpointSteps(Tmp("no-such-dir").string()).empty());
}

TEST(ExportTest, CopiesTheLatestCheckpointByDefault) {
  const fs::path job = MakeJobDir("latest");
  ExportOptions options{job.string(), -1, Tmp("out-latest").string()};
  auto source = ExportCheckpoint(options);
  ASSERT_TRUE(source.ok()) << source.status();
  EXPECT_EQ(*source, (job / "step-100").string());
  EXPECT_EQ(ReadAll(Tmp("out-latest") / "config.json"), "step-100");
}

TEST(ExportTest, CopiesTheAskedStepIntoAnEmptyDirectory) {
  const fs::path job = MakeJobDir("asked");
  fs::create_directories(Tmp("out-empty"));
  ExportOptions options{job.string(), 20, Tmp("out-empty").string()};
  ASSERT_TRUE(ExportCheckpoint(options).ok());
  EXPECT_EQ(ReadAll(Tmp("out-empty") / "config.json"), "step-20");
}

TEST(ExportTest, MissingStepListsTheAvailableOnes) {
  const fs::path job = MakeJobDir("missing");
  ExportOptions options{job.string(), 200, Tmp("out-missing").string()};
  const absl::Status status = ExportCheckpoint(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("--step 200"), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find("available steps: 20, 100"), absl::string_view::npos)
      << status;
  EXPECT_FALSE(fs::exists(Tmp("out-missing")));
}

TEST(ExportTest, RefusesANonEmptyDestination) {
  const fs::path job = MakeJobDir("full");
  fs::create_directories(Tmp("out-full"));
  std::ofstream(Tmp("out-full") / "keep.txt") << "mine";
  ExportOptions options{job.string(), -1, Tmp("out-full").string()};
  const absl::Status status = ExportCheckpoint(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("out-full"), absl::string_view::npos) << status;
  EXPECT_EQ(ReadAll(Tmp("out-full") / "keep.txt"), "mine");
}

TEST(ExportTest, NoCheckpointYet) {
  fs::create_directories(Tmp("empty-job"));
  ExportOptions options{Tmp("empty-job").string(), -1, Tmp("out-none").string()};
  const absl::Status status = ExportCheckpoint(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("no complete checkpoint"), absl::string_view::npos);
}

}  // namespace
}  // namespace lumen
