#include "common/paths.h"

#include <stdlib.h>
#include <unistd.h>

#include <optional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::MatchesRegex;

// Sets or unsets environment variables for one test and restores them afterwards.
class PathsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kVars) {
      const char* v = getenv(name);
      saved_.push_back(v == nullptr ? std::nullopt : std::optional<std::string>(v));
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (size_t i = 0; i < saved_.size(); ++i) {
      if (saved_[i].has_value()) {
        setenv(kVars[i], saved_[i]->c_str(), 1);
      } else {
        unsetenv(kVars[i]);
      }
    }
  }
  static constexpr const char* kVars[] = {"LUMEN_HOME", "LUMEN_SOCKET", "XDG_RUNTIME_DIR",
                                          "HOME"};
  std::vector<std::optional<std::string>> saved_;
};

TEST_F(PathsTest, DataDirFromLumenHome) {
  setenv("HOME", "/home/ada", 1);
  setenv("LUMEN_HOME", "/srv/lumen", 1);
  EXPECT_EQ(DefaultDataDir(), "/srv/lumen");
}

TEST_F(PathsTest, DataDirUnderHome) {
  setenv("HOME", "/home/ada", 1);
  EXPECT_EQ(DefaultDataDir(), "/home/ada/.local/share/lumen");
  setenv("LUMEN_HOME", "", 1);  // empty counts as unset
  EXPECT_EQ(DefaultDataDir(), "/home/ada/.local/share/lumen");
}

TEST_F(PathsTest, DataDirWithoutHomeUsesPasswordDatabase) {
  std::string dir = DefaultDataDir();
  EXPECT_THAT(dir, MatchesRegex("/.*/\\.local/share/lumen|/\\.local/share/lumen"));
}

TEST_F(PathsTest, SocketFromEnvironment) {
  setenv("LUMEN_SOCKET", "/run/x.sock", 1);
  EXPECT_EQ(DefaultSocketPath("/srv/lumen"), "/run/x.sock");
}

TEST_F(PathsTest, SocketInDataDirWhenShort) {
  EXPECT_EQ(DefaultSocketPath("/srv/lumen"), "/srv/lumen/lumend.sock");
  std::string dir(100 - 1 - std::string("/lumend.sock").size(), 'd');
  dir[0] = '/';
  EXPECT_EQ(DefaultSocketPath(dir), dir + "/lumend.sock");  // 99 bytes
}

TEST_F(PathsTest, LongDataDirUsesRuntimeDir) {
  std::string dir = "/" + std::string(99 - std::string("/lumend.sock").size(), 'd');
  ASSERT_EQ((dir + "/lumend.sock").size(), 100u);
  setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
  std::string sock = DefaultSocketPath(dir);
  EXPECT_THAT(sock, MatchesRegex("/run/user/1000/lumen-[0-9a-f]{16}\\.sock"));
  // Stable, and different for a different directory.
  EXPECT_EQ(DefaultSocketPath(dir), sock);
  EXPECT_NE(DefaultSocketPath(dir + "x"), sock);
  // The hash is of the absolute, normalised path.
  EXPECT_EQ(DefaultSocketPath(dir + "/./"), sock);

  unsetenv("XDG_RUNTIME_DIR");
  EXPECT_THAT(DefaultSocketPath(dir), MatchesRegex("/tmp/lumen-[0-9a-f]{16}\\.sock"));
  EXPECT_EQ(DefaultSocketPath(dir).substr(5), sock.substr(15));
}

TEST_F(PathsTest, RelativeLongDataDirHashesAbsolutePath) {
  char cwd[4096];
  ASSERT_NE(getcwd(cwd, sizeof(cwd)), nullptr);
  std::string rel(120, 'r');
  EXPECT_EQ(DefaultSocketPath(rel), DefaultSocketPath(std::string(cwd) + "/" + rel));
}

TEST(AbsolutePathTest, Normalises) {
  EXPECT_EQ(AbsolutePath("/a/./b/../c/"), "/a/c");
  EXPECT_EQ(AbsolutePath("/"), "/");
  EXPECT_EQ(AbsolutePath("/.."), "/");
  char cwd[4096];
  ASSERT_NE(getcwd(cwd, sizeof(cwd)), nullptr);
  EXPECT_EQ(AbsolutePath("x/y"), AbsolutePath(std::string(cwd) + "/x/y"));
}

}  // namespace
}  // namespace lumen
