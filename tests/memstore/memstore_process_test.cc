// Starts the real memstore binary and drives it through GrpcMemstoreClient (gRPC control, UCX
// bytes): restart after kill -9, a full NVMe tier, and four client processes hammering it.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "memstore/memstore_client.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::string Runfile(const std::string& path) {
  const char* root = getenv("TEST_SRCDIR");
  return std::string(root ? root : ".") + "/lumen/" + path;
}

// The bytes of tensor `id` at generation `gen`: derived from both, so a stale or torn read shows.
std::vector<uint8_t> Pattern(const std::string& id, uint64_t gen, size_t size) {
  std::vector<uint8_t> v(size);
  uint64_t x = std::hash<std::string>()(id) ^ (gen * 0x9E3779B97F4A7C15ull);
  for (size_t i = 0; i < size; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    memcpy(v.data() + i, &x, std::min<size_t>(8, size - i));
  }
  return v;
}

class MemstoreProcess {
 public:
  MemstoreProcess(const fs::path& dir, int64_t host_bytes, const std::string& nvme)
      : dir_(dir), host_bytes_(host_bytes), nvme_(nvme) {}
  ~MemstoreProcess() { Kill(SIGTERM); }

  std::string socket() const { return (dir_ / "m.sock").string(); }

  void Start() {
    fs::remove(socket());
    pid_ = fork();
    if (pid_ == 0) {
      const std::string log = (dir_ / "memstore.log").string();
      freopen(log.c_str(), "a", stderr);
      std::vector<std::string> args = {Runfile("memstore/memstore"), "--data-dir",
                                       dir_.string(), "--socket", socket(),
                                       "--host-memory", std::to_string(host_bytes_),
                                       "--nvme-dir", nvme_, "--page-bytes",
                                       std::to_string(16 << 20)};
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 300 && !fs::exists(socket()); ++i) absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(fs::exists(socket())) << "memstore did not start; see " << dir_ / "memstore.log";
  }

  void Kill(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  fs::path dir_;
  int64_t host_bytes_;
  std::string nvme_;
  pid_t pid_ = -1;
};

fs::path TestDir() {
  // Short: the Unix socket path must stay under 108 bytes.
  char tmpl[] = "/tmp/lumen-memstore-XXXXXX";
  return fs::path(mkdtemp(tmpl));
}

TEST(MemstoreProcessTest, KillNineKeepsNvmeTensorsAndReportsHostOnesLost) {
  const fs::path dir = TestDir();
  constexpr int64_t kTensor = 64 << 20;
  constexpr int kEach = 8;  // 8 host + 8 NVMe tensors of 64 MiB: 1 GiB
  MemstoreProcess memstore(dir, 640ll << 20, (dir / "nvme").string());
  memstore.Start();
  {
    GrpcMemstoreClient client(memstore.socket());
    for (int i = 0; i < 2 * kEach; ++i) {
      const std::string id = absl::StrCat("t", i);
      const auto bytes = Pattern(id, 1, kTensor);
      ASSERT_TRUE(client.Write(id, bytes.data(), kTensor, "f32", i < kEach ? TIER_HOST : TIER_NVME)
                      .ok());
    }
  }
  memstore.Kill(SIGKILL);
  memstore.Start();
  GrpcMemstoreClient client(memstore.socket());
  auto stats = client.GetStats(absl::Seconds(10));
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->lost_tensors_size(), kEach);  // reported in status, not served as garbage
  EXPECT_EQ(stats->tensors(), 2 * kEach);
  std::vector<uint8_t> buf(kTensor);
  for (int i = 0; i < 2 * kEach; ++i) {
    const std::string id = absl::StrCat("t", i);
    auto n = client.Read(id, buf.data(), buf.size());
    if (i < kEach) {
      ASSERT_EQ(n.status().code(), absl::StatusCode::kDataLoss) << id;
      EXPECT_THAT(std::string(n.status().message()), HasSubstr("is lost"));
    } else {
      ASSERT_TRUE(n.ok()) << n.status();
      ASSERT_EQ(*n, kTensor);
      ASSERT_TRUE(buf == Pattern(id, 1, kTensor)) << id << " differs after the restart";
    }
  }
  memstore.Kill(SIGTERM);
  fs::remove_all(dir);
}

TEST(MemstoreProcessTest, FullNvmeTierIsResourceExhaustedAndKeepsServing) {
  const fs::path dir = TestDir();
  MemstoreProcess memstore(dir, 64 << 20, (dir / "nvme").string() + ":8MiB");
  memstore.Start();
  GrpcMemstoreClient client(memstore.socket());
  constexpr int64_t kSize = 1 << 20;
  absl::Status s;
  int i = 0;
  for (; i < 100; ++i) {
    const auto bytes = Pattern(absl::StrCat("f", i), 1, kSize);
    s = client.Write(absl::StrCat("f", i), bytes.data(), kSize, "u8", TIER_NVME);
    if (!s.ok()) break;
  }
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("NVMe tier"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("of 8388608 bytes used"));
  std::vector<uint8_t> buf(kSize);
  for (int k = 0; k < i; ++k) {
    auto n = client.Read(absl::StrCat("f", k), buf.data(), buf.size());
    ASSERT_TRUE(n.ok()) << n.status();
    ASSERT_TRUE(buf == Pattern(absl::StrCat("f", k), 1, kSize));
  }
  ASSERT_TRUE(client.Free("f0").ok());
  const auto bytes = Pattern("again", 1, kSize);
  EXPECT_TRUE(client.Write("again", bytes.data(), kSize, "u8", TIER_NVME).ok());
  auto stats = client.GetStats(absl::Seconds(5));
  ASSERT_TRUE(stats.ok());
  memstore.Kill(SIGTERM);
  fs::remove_all(dir);
}

// Four client processes read, write and move distinct and shared tensors for
// LUMEN_CONCURRENCY_SECONDS (default 60), verifying every byte they read. gRPC does not survive
// fork(), so this test runs in a process that has not used gRPC (see BUILD.bazel).
TEST(MemstoreProcessTest, FourClientProcessesVerifyEveryByte) {
  const char* env = getenv("LUMEN_CONCURRENCY_SECONDS");
  const int seconds = env ? atoi(env) : 60;
  const fs::path dir = TestDir();
  MemstoreProcess memstore(dir, 256 << 20, (dir / "nvme").string());
  memstore.Start();
  constexpr int kClients = 4;
  constexpr int kShared = 4;
  constexpr size_t kSize = 3 << 20;
  std::vector<pid_t> children;
  for (int c = 0; c < kClients; ++c) {
    const pid_t pid = fork();
    if (pid == 0) {
      // A shared tensor holds Pattern(id, g) for some generation g, named in its first 8 bytes,
      // so readers can check all bytes whichever writer won.
      GrpcMemstoreClient client(memstore.socket());
      auto fail = [c](int code, const absl::Status& s) {
        fprintf(stderr, "client %d: exit %d: %s\n", c, code, s.ToString().c_str());
        _exit(code);
      };
      std::mt19937_64 rng(c);
      std::vector<uint8_t> buf(kSize);
      const absl::Time end = absl::Now() + absl::Seconds(seconds);
      int64_t ops = 0;
      while (absl::Now() < end) {
        const std::string shared = absl::StrCat("shared", rng() % kShared);
        const std::string own = absl::StrCat("own", c, "-", rng() % 3);
        const Tier tier = rng() % 2 ? TIER_HOST : TIER_NVME;
        const uint64_t gen = (static_cast<uint64_t>(c) << 32) | ++ops;
        switch (rng() % 5) {
          case 0:
          case 1: {
            auto bytes = Pattern(shared, gen, kSize);
            memcpy(bytes.data(), &gen, sizeof(gen));
            absl::Status s = client.Write(shared, bytes.data(), kSize, "u8", tier);
            if (!s.ok()) fail(2, s);
            break;
          }
          case 2: {
            auto n = client.Read(shared, buf.data(), buf.size());
            if (n.status().code() == absl::StatusCode::kNotFound) break;
            if (!n.ok() || *n != static_cast<int64_t>(kSize)) fail(3, n.status());
            uint64_t g;
            memcpy(&g, buf.data(), sizeof(g));
            auto expect = Pattern(shared, g, kSize);
            if (memcmp(buf.data() + 8, expect.data() + 8, kSize - 8) != 0) {
              fail(4, absl::DataLossError(absl::StrCat(shared, " generation ", g, " is wrong")));
            }
            break;
          }
          case 3: {
            absl::Status s = client.Move(shared, tier);
            if (!s.ok() && s.code() != absl::StatusCode::kNotFound) fail(5, s);
            break;
          }
          default: {
            const auto bytes = Pattern(own, gen, kSize);
            absl::Status s = client.Write(own, bytes.data(), kSize, "u8", tier);
            if (!s.ok()) fail(6, s);
            auto n = client.Read(own, buf.data(), buf.size());
            if (!n.ok()) fail(7, n.status());
            if (buf != bytes) fail(8, absl::DataLossError(own + " read back wrong bytes"));
          }
        }
      }
      _exit(0);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "client process failed with status " << status
        << " (2 write, 3 read, 4 wrong bytes, 5 move, 6/7 own tensor)";
  }
  memstore.Kill(SIGTERM);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lumen
