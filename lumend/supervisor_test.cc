#include "lumend/supervisor.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

std::string TestDir(const std::string& name) {
  const char* base = getenv("TEST_TMPDIR");
  std::string dir = std::string(base != nullptr ? base : "/tmp") + "/" + name;
  mkdir(dir.c_str(), 0755);
  return dir;
}

bool ProcessExists(pid_t pid) { return kill(pid, 0) == 0 || errno != ESRCH; }

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ChildSpec Sh(const std::string& name, const std::string& script) {
  return ChildSpec{name, {"/bin/sh", "-c", script}, "", {}, ""};
}

// Waits until `pred(Snapshot())` holds or `timeout` passes.
template <typename Pred>
bool WaitFor(const Supervisor& s, Pred pred, absl::Duration timeout = absl::Seconds(10)) {
  absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (pred(s.Snapshot())) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

// Runs a supervisor on its own thread: Start() and Run() on that thread, as the contract asks.
class Runner {
 public:
  explicit Runner(Supervisor* s) : s_(s) {
    thread_ = std::thread([this] {
      EXPECT_TRUE(s_->Start().ok());
      absl::Status status = s_->Run();
      EXPECT_TRUE(status.ok()) << status;
    });
  }
  // Requests a stop and returns how long Run() took to return.
  absl::Duration Stop() {
    absl::Time begin = absl::Now();
    s_->RequestStop();
    thread_.join();
    return absl::Now() - begin;
  }
  ~Runner() {
    if (thread_.joinable()) Stop();
  }

 private:
  Supervisor* s_;
  std::thread thread_;
};

TEST(NextBackoffTest, DoublesUpToMaxAndResetsAfterHealthyRun) {
  BackoffPolicy p;  // 0.5 s doubling to 30 s, reset after 60 s
  absl::Duration d = NextBackoff(p, absl::ZeroDuration(), absl::Seconds(1));
  EXPECT_EQ(d, absl::Milliseconds(500));
  std::vector<absl::Duration> seen;
  for (int i = 0; i < 8; ++i) {
    d = NextBackoff(p, d, absl::Seconds(1));
    seen.push_back(d);
  }
  EXPECT_EQ(seen[0], absl::Seconds(1));
  EXPECT_EQ(seen[1], absl::Seconds(2));
  EXPECT_EQ(seen[5], absl::Seconds(30));  // 32 s capped
  EXPECT_EQ(seen[7], absl::Seconds(30));
  EXPECT_EQ(NextBackoff(p, absl::Seconds(30), absl::Seconds(60)), absl::Milliseconds(500));
  EXPECT_EQ(NextBackoff(p, absl::Seconds(30), absl::Seconds(59)), absl::Seconds(30));
}

TEST(SupervisorTest, RejectsBadSpecs) {
  auto dup = Supervisor::Create({Sh("a", "true"), Sh("a", "true")}, {});
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dup.status().message(), HasSubstr("\"a\""));
  auto empty = Supervisor::Create({ChildSpec{"x", {}, "", {}, ""}}, {});
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(empty.status().message(), HasSubstr("child \"x\" has no executable"));
}

TEST(SupervisorTest, RestartsCrashingChildWithBackoff) {
  SupervisorOptions opts;
  opts.backoff = {absl::Milliseconds(50), absl::Milliseconds(200), absl::Seconds(60)};
  absl::Mutex mu;
  std::vector<absl::Time> starts;  // start times of "crasher" seen by on_change
  opts.on_change = [&](const std::vector<ProcessStatus>& s) {
    absl::MutexLock lock(&mu);
    if (s[0].up && (starts.empty() || starts.back() != s[0].start_time)) {
      starts.push_back(s[0].start_time);
    }
  };
  auto s = Supervisor::Create({Sh("crasher", "exit 3"), {"sleeper", {"/bin/sleep", "1000"}}},
                              opts);
  ASSERT_TRUE(s.ok()) << s.status();
  Runner runner(s->get());
  ASSERT_TRUE(WaitFor(**s, [](const std::vector<ProcessStatus>& st) {
    return st[0].restarts >= 4;
  }));
  std::vector<ProcessStatus> st = (*s)->Snapshot();
  EXPECT_EQ(st[0].name, "crasher");
  EXPECT_EQ(st[0].last_exit, "exited with status 3");
  EXPECT_EQ(st[1].restarts, 0);
  EXPECT_TRUE(st[1].up);
  runner.Stop();

  // Gaps between starts follow 50, 100, 200, 200 ms (plus scheduling noise).
  absl::MutexLock lock(&mu);
  ASSERT_GE(starts.size(), 5u);
  const absl::Duration expected[] = {absl::Milliseconds(50), absl::Milliseconds(100),
                                     absl::Milliseconds(200), absl::Milliseconds(200)};
  for (int i = 0; i < 4; ++i) {
    absl::Duration gap = starts[i + 1] - starts[i];
    EXPECT_GE(gap, expected[i]) << "restart " << i + 1;
    EXPECT_LT(gap, expected[i] + absl::Seconds(1)) << "restart " << i + 1;
  }
}

TEST(SupervisorTest, RestartsKilledChildAndReportsSignal) {
  SupervisorOptions opts;
  opts.backoff = {absl::Milliseconds(10), absl::Milliseconds(10), absl::Seconds(60)};
  auto s = Supervisor::Create({{"sleeper", {"/bin/sleep", "1000"}}}, opts);
  ASSERT_TRUE(s.ok());
  Runner runner(s->get());
  ASSERT_TRUE(WaitFor(**s, [](const auto& st) { return st[0].up; }));
  pid_t first = (*s)->Snapshot()[0].pid;
  ASSERT_EQ(kill(first, SIGKILL), 0);
  ASSERT_TRUE(WaitFor(**s, [&](const auto& st) { return st[0].up && st[0].pid != first; }));
  ProcessStatus st = (*s)->Snapshot()[0];
  EXPECT_EQ(st.restarts, 1);
  EXPECT_THAT(st.last_exit, HasSubstr("killed by signal 9 (SIGKILL)"));
  runner.Stop();
  EXPECT_FALSE(ProcessExists(st.pid));
}

TEST(SupervisorTest, StopsEveryChildWithinDeadline) {
  SupervisorOptions opts;
  opts.stop_grace = absl::Milliseconds(500);
  std::string dir = TestDir("stop");
  std::string sock = dir + "/child.sock";
  std::ofstream(sock) << "stale";
  ChildSpec stubborn = Sh("stubborn", "trap '' TERM; exec /bin/sleep 1000");
  stubborn.sockets = {sock};
  auto s = Supervisor::Create(
      {{"a", {"/bin/sleep", "1000"}}, {"b", {"/bin/sleep", "1000"}}, stubborn}, opts);
  ASSERT_TRUE(s.ok());
  Runner runner(s->get());
  ASSERT_TRUE(WaitFor(**s, [](const auto& st) {
    for (const ProcessStatus& p : st) {
      if (!p.up) return false;
    }
    return true;
  }));
  EXPECT_FALSE(FileExists(sock)) << "stale socket not removed before start";
  absl::SleepFor(absl::Milliseconds(100));  // let the shell install its trap
  std::ofstream(sock) << "the child's socket";
  std::vector<ProcessStatus> before = (*s)->Snapshot();

  absl::Duration took = runner.Stop();
  EXPECT_LT(took, opts.stop_grace + absl::Seconds(2));
  std::vector<ProcessStatus> after = (*s)->Snapshot();
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_FALSE(ProcessExists(before[i].pid)) << before[i].name;
    EXPECT_FALSE(after[i].up) << after[i].name;
  }
  EXPECT_EQ(after[0].last_exit, "killed by signal 15 (SIGTERM)");
  EXPECT_EQ(after[2].last_exit, "killed by signal 9 (SIGKILL)");
  EXPECT_GE(took, opts.stop_grace);  // the stubborn child needed SIGKILL
  EXPECT_FALSE(FileExists(sock));
}

TEST(SupervisorTest, StopBeforeRunStillStopsChildren) {
  auto s = Supervisor::Create({{"a", {"/bin/sleep", "1000"}}}, {});
  ASSERT_TRUE(s.ok());
  (*s)->RequestStop();
  ASSERT_TRUE((*s)->Start().ok());
  pid_t pid = (*s)->Snapshot()[0].pid;
  ASSERT_TRUE((*s)->Run().ok());
  EXPECT_FALSE(ProcessExists(pid));
}

TEST(SupervisorTest, AppendsOutputToLogFile) {
  std::string dir = TestDir("log");
  std::string log = dir + "/echo.log";
  std::ofstream(log) << "earlier line\n";
  SupervisorOptions opts;
  opts.backoff = {absl::Seconds(10), absl::Seconds(10), absl::Seconds(60)};
  ChildSpec echo = Sh("echo", "echo to-stdout; echo to-stderr >&2");
  echo.log_file = log;
  ChildSpec missing{"missing", {dir + "/no-such-binary"}, dir + "/missing.log", {}, ""};
  auto s = Supervisor::Create({echo, missing}, opts);
  ASSERT_TRUE(s.ok());
  Runner runner(s->get());
  ASSERT_TRUE(WaitFor(**s, [](const auto& st) {
    return !st[0].last_exit.empty() && !st[1].last_exit.empty();
  }));
  runner.Stop();
  std::vector<ProcessStatus> st = (*s)->Snapshot();
  EXPECT_EQ(st[0].last_exit, "exited with status 0");
  EXPECT_EQ(st[0].log_file, log);
  std::string text = ReadFile(log);
  EXPECT_THAT(text, HasSubstr("earlier line\n"));
  EXPECT_THAT(text, HasSubstr("=== lumend: starting echo"));
  EXPECT_THAT(text, HasSubstr("to-stdout\n"));
  EXPECT_THAT(text, HasSubstr("to-stderr\n"));
  EXPECT_EQ(st[1].last_exit, "exited with status 127");
  EXPECT_THAT(ReadFile(dir + "/missing.log"),
              HasSubstr("lumend: cannot execute " + dir + "/no-such-binary (errno 2)"));
}

TEST(SupervisorTest, ChildInheritsNoDescriptors) {
  std::string dir = TestDir("fds");
  std::string log = dir + "/fds.log";
  SupervisorOptions opts;
  opts.backoff = {absl::Seconds(10), absl::Seconds(10), absl::Seconds(60)};
  ChildSpec ls = Sh("ls", "ls /proc/self/fd");
  ls.log_file = log;
  auto s = Supervisor::Create({ls}, opts);
  ASSERT_TRUE(s.ok());
  Runner runner(s->get());
  ASSERT_TRUE(WaitFor(**s, [](const auto& st) { return !st[0].last_exit.empty(); }));
  runner.Stop();
  // 0, 1, 2 and the directory ls itself opens (3).
  std::string text = ReadFile(log);
  EXPECT_THAT(text.substr(text.find('\n') + 1), ::testing::StrEq("0\n1\n2\n3\n"));
}

}  // namespace
}  // namespace lumen
