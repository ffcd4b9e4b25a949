#include "lumend/node.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/cpus.h"
#include "common/node_options.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TestDir(const std::string& name) {
  const char* base = getenv("TEST_TMPDIR");
  std::string dir = std::string(base != nullptr ? base : "/tmp") + "/" + name;
  mkdir(dir.c_str(), 0755);
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

void WriteScript(const std::string& path, const std::string& body) {
  std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
  chmod(path.c_str(), 0755);
}

TEST(DataDirLockTest, SecondInstanceIsRefused) {
  std::string dir = TestDir("lock");
  ASSERT_TRUE(PrepareDataDir(dir).ok());
  EXPECT_TRUE(FileExists(dir + "/logs"));
  EXPECT_TRUE(FileExists(dir + "/run"));
  auto first = DataDirLock::Acquire(dir);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(ReadFile(dir + "/lumend.lock"), absl::StrCat(getpid(), "\n"));

  auto second = DataDirLock::Acquire(dir);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(second.status().message(),
              HasSubstr(absl::StrCat("another lumend (pid ", getpid(),
                                     ") is using data directory ", dir)));

  first->reset();
  EXPECT_FALSE(FileExists(dir + "/lumend.lock"));
  auto third = DataDirLock::Acquire(dir);
  EXPECT_TRUE(third.ok()) << third.status();
}

TEST(PickFreePortTest, ReturnsAPort) {
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EXPECT_LT(*port, 65536);
}

TEST(FindChildBinariesTest, BinDirAndErrors) {
  std::string dir = TestDir("bins");
  for (const char* name : {"memstore", "worker", "coordinator"}) {
    WriteScript(dir + "/" + name, "exit 0");
  }
  auto bins = FindChildBinaries(dir, "/nowhere/lumend");
  ASSERT_TRUE(bins.ok()) << bins.status();
  EXPECT_EQ(bins->memstore, dir + "/memstore");
  EXPECT_EQ(bins->coordinator, dir + "/coordinator");

  // Install layout: next to lumend.
  bins = FindChildBinaries("", dir + "/lumend");
  ASSERT_TRUE(bins.ok()) << bins.status();
  EXPECT_EQ(bins->worker, dir + "/worker");

  // Runfiles layout wins over the install layout.
  std::string runfiles = dir + "/lumend.runfiles/lumen/worker";
  ASSERT_EQ(system(("mkdir -p " + runfiles).c_str()), 0);
  WriteScript(runfiles + "/worker", "exit 0");
  bins = FindChildBinaries("", dir + "/lumend");
  ASSERT_TRUE(bins.ok()) << bins.status();
  EXPECT_EQ(bins->worker, runfiles + "/worker");

  std::string empty = TestDir("nobins");
  auto missing = FindChildBinaries(empty, "/x/lumend");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("memstore (tried " + empty + "/memstore)"));
  EXPECT_THAT(missing.status().message(), HasSubstr("--bin-dir"));
  unsetenv("RUNFILES_DIR");
  missing = FindChildBinaries("", "/x/lumend");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(),
              HasSubstr("worker (tried /x/lumend.runfiles/lumen/worker/worker, /x/worker)"));
}

TEST(BuildChildSpecsTest, CommandLinesAreTheContract) {
  NodeOptions o;
  o.data_dir = "/d";
  o.socket = "/d/lumend.sock";
  o.listen = "127.0.0.1:7000";
  o.workers = 2;
  o.device = DeviceKind::kCpu;
  o.device_memory_bytes = 64 << 20;
  o.host_memory_bytes = 1 << 30;
  o.nvme_dirs = {{"/n0", 0}, {"/n1", 1000}};
  ChildBinaries bins{"/b/memstore", "/b/worker", "/b/coordinator"};
  ChildPorts ports{9001, {9002, 9003}, 9004};
  std::vector<ChildSpec> specs = BuildChildSpecs(o, bins, ports);
  ASSERT_EQ(specs.size(), 4u);
  EXPECT_EQ(specs[0].name, "memstore");
  EXPECT_THAT(specs[0].argv,
              ElementsAre("/b/memstore", "--data-dir", "/d", "--socket", "/d/run/memstore.sock",
                          "--metrics-address", "127.0.0.1:9001", "--host-memory", "1073741824",
                          "--nvme-dir", "/n0", "--nvme-dir", "/n1:1000"));
  EXPECT_EQ(specs[0].log_file, "/d/logs/memstore.log");
  EXPECT_EQ(specs[1].name, "worker-0");
  EXPECT_THAT(specs[2].argv,
              ElementsAre("/b/worker", "--data-dir", "/d", "--id", "1", "--socket",
                          "/d/run/worker-1.sock", "--metrics-address", "127.0.0.1:9003",
                          "--device", "cpu", "--device-memory", "67108864",
                          "--memstore-socket", "/d/run/memstore.sock",
                          "--optimizer-state-tier", "host", "--optimizer-overlap", "forward",
                          "--link-gbps", "0", "--threads",
                          absl::StrCat(std::max(1, UsableCpus() / 2))));
  EXPECT_THAT(specs[2].sockets, ElementsAre("/d/run/worker-1.sock"));
  EXPECT_EQ(specs[3].name, "coordinator");
  EXPECT_THAT(specs[3].argv,
              ElementsAre("/b/coordinator", "--data-dir", "/d", "--socket", "/d/lumend.sock",
                          "--listen", "127.0.0.1:7000", "--metrics-address", "127.0.0.1:9004",
                          "--worker-sockets", "/d/run/worker-0.sock,/d/run/worker-1.sock",
                          "--memstore-socket", "/d/run/memstore.sock", "--node-status",
                          "/d/node.json", "--device", "cpu"));
  EXPECT_THAT(specs[3].sockets, ElementsAre("/d/lumend.sock"));
  EXPECT_EQ(specs[3].metrics_address, "127.0.0.1:9004");

  o.listen = "";
  o.device = DeviceKind::kCuda;
  specs = BuildChildSpecs(o, bins, ports);
  EXPECT_THAT(specs[3].argv, ::testing::Not(::testing::Contains("--listen")));
  // The coordinator resolves and checks jobs for the node's device (precision: bf16 on GPUs).
  EXPECT_EQ(specs[3].argv.back(), "cuda");
  EXPECT_THAT(specs[1].argv, ::testing::Contains("cuda"));
  // Two GPU workers share the cores for their host AdamW (CPU devices for their kernels).
  const int cores = UsableCpus();
  const std::vector<std::string>& a = specs[1].argv;
  const auto threads = std::find(a.begin(), a.end(), "--threads");
  ASSERT_NE(threads, a.end());
  ASSERT_NE(threads + 1, a.end());
  EXPECT_EQ(*(threads + 1), absl::StrCat(std::max(1, cores / 2)));
  // One worker has every core.
  o.workers = 1;
  specs = BuildChildSpecs(o, bins, ports);
  EXPECT_THAT(specs[1].argv, ::testing::Not(::testing::Contains("--threads")));
}

// A stand-in worker for the CUDA probe: GPU 0 works, GPU 1 does not (as on a one-GPU machine).
std::string FakeProbeWorker(const std::string& dir) {
  const std::string path = dir + "/worker";
  std::ofstream(path) << "#!/bin/sh\n"
                         "echo \"$*\" >> " << dir << "/calls\n"
                         "case \"$*\" in\n"
                         "  *'--id 0'*) echo 'Fake GPU (sm_90, 80.0 GiB), budget 1024 bytes'; exit 0;;\n"
                         "  *) echo 'GPU 1 does not exist: this machine has 1 usable CUDA device(s)' >&2;"
                         " exit 1;;\n"
                         "esac\n";
  chmod(path.c_str(), 0755);
  return path;
}

TEST(ProbeWorkerDevicesTest, AsksEachCudaWorkerAndQuotesTheOneThatCannot) {
  const std::string dir = TestDir("probe");
  const std::string worker = FakeProbeWorker(dir);
  NodeOptions o;
  o.workers = 1;
  o.device = DeviceKind::kCuda;
  o.device_memory_bytes = 0;
  auto answers = ProbeWorkerDevices(o, worker);
  ASSERT_TRUE(answers.ok()) << answers.status();
  EXPECT_THAT(*answers, ElementsAre("worker-0: Fake GPU (sm_90, 80.0 GiB), budget 1024 bytes"));
  EXPECT_EQ(ReadFile(dir + "/calls"), "--probe --device cuda --id 0 --device-memory 0\n");

  o.workers = 2;
  answers = ProbeWorkerDevices(o, worker);
  EXPECT_EQ(answers.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(answers.status().message(),
              HasSubstr("worker-1 cannot drive GPU 1: GPU 1 does not exist: this machine has 1"));

  EXPECT_EQ(ProbeWorkerDevices(o, dir + "/missing").status().code(),
            absl::StatusCode::kFailedPrecondition);

  // A probe that hangs (a wedged driver) is killed and named.
  const std::string hung = dir + "/hung";
  std::ofstream(hung) << "#!/bin/sh\nexec sleep 30\n";
  chmod(hung.c_str(), 0755);
  o.workers = 1;
  const absl::Time start = absl::Now();
  answers = ProbeWorkerDevices(o, hung, absl::Milliseconds(300));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(answers.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(answers.status().message(), HasSubstr("did not answer within 300ms"));

  o.device = DeviceKind::kCpu;  // nothing to ask
  answers = ProbeWorkerDevices(o, dir + "/missing");
  ASSERT_TRUE(answers.ok());
  EXPECT_TRUE(answers->empty());
}

TEST(StatusFilesTest, NodeJsonAndTargets) {
  LumendInfo info{"/d", "/d/lumend.sock", 42, "127.0.0.1:9000"};
  ProcessStatus p;
  p.name = "coordinator";
  p.pid = 123;
  p.up = true;
  p.restarts = 2;
  p.start_time = absl::FromUnixSeconds(1700000000);
  p.last_exit = "killed by signal 9 (SIGKILL)";
  p.metrics_address = "127.0.0.1:9004";
  p.log_file = "/d/logs/coordinator.log";
  p.sockets = {"/d/lumend.sock"};
  EXPECT_EQ(NodeStatusJson(info, {p}),
            "{\n  \"data_dir\":\"/d\",\n  \"socket\":\"/d/lumend.sock\",\n  \"lumend_pid\":42,\n"
            "  \"lumend_metrics_address\":\"127.0.0.1:9000\",\n  \"processes\":[\n"
            "    {\"name\":\"coordinator\",\"pid\":123,\"up\":true,\"restarts\":2,"
            "\"start_time\":1700000000.000,\"last_exit\":\"killed by signal 9 (SIGKILL)\","
            "\"metrics_address\":\"127.0.0.1:9004\",\"log_file\":\"/d/logs/coordinator.log\","
            "\"socket\":\"/d/lumend.sock\"}\n  ]\n}\n");
  EXPECT_EQ(PrometheusTargetsJson(info, {p}),
            "[\n  {\"targets\":[\"127.0.0.1:9000\"],\"labels\":{\"process\":\"lumend\","
            "\"job\":\"lumen\"}},\n  {\"targets\":[\"127.0.0.1:9004\"],\"labels\":{\"process\":"
            "\"coordinator\",\"job\":\"lumen\"}}\n]\n");
  info.data_dir = "/a\"b\\c\n";
  EXPECT_THAT(NodeStatusJson(info, {}), HasSubstr("\"data_dir\":\"/a\\\"b\\\\c\\n\""));
}

TEST(StatusFilesTest, WriteFileAtomically) {
  std::string path = TestDir("atomic") + "/f.json";
  ASSERT_TRUE(WriteFileAtomically(path, "one").ok());
  ASSERT_TRUE(WriteFileAtomically(path, "two").ok());
  EXPECT_EQ(ReadFile(path), "two");
  absl::Status s = WriteFileAtomically("/nonexistent-dir/x.json", "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("/nonexistent-dir/x.json.tmp."));
}

// A whole node whose children are shell scripts standing in for the real binaries.
TEST(NodeTest, RunsChildrenWritesStatusAndCleansUp) {
  std::string dir = TestDir("node");
  std::string bin = TestDir("node-bin");
  // Each fake child records its arguments and creates its --socket, then sleeps.
  const std::string fake =
      "echo \"$0 $*\" > \"$(dirname \"$0\")/$(basename \"$0\").args\"\n"
      "while [ $# -gt 0 ]; do [ \"$1\" = --socket ] && touch \"$2\"; shift; done\n"
      "exec sleep 1000";
  for (const char* name : {"memstore", "worker", "coordinator"}) {
    WriteScript(bin + "/" + name, fake);
  }
  NodeOptions o;
  o.data_dir = dir + "/data";
  o.socket = o.data_dir + "/lumend.sock";
  o.workers = 2;
  o.bin_dir = bin;
  ASSERT_TRUE(PrepareDataDir(o.data_dir).ok());
  auto lock = DataDirLock::Acquire(o.data_dir);
  ASSERT_TRUE(lock.ok());
  SupervisorOptions sup;
  sup.stop_grace = absl::Seconds(2);
  auto node = Node::Create(o, std::move(*lock), "/x/lumend", sup);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_THAT((*node)->ServingLine(),
              ::testing::StrEq("lumend: serving on " + o.socket + " (data dir " + o.data_dir +
                               ")"));

  std::thread run([&] {
    ASSERT_TRUE((*node)->Start().ok());
    ASSERT_TRUE((*node)->Run().ok());
  });
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline && !(FileExists(o.socket) &&
                                     FileExists(o.data_dir + "/run/worker-1.sock"))) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  std::string node_json = ReadFile(o.data_dir + "/node.json");
  EXPECT_THAT(node_json, HasSubstr("\"lumend_pid\":" + std::to_string(getpid())));
  EXPECT_THAT(node_json, HasSubstr("{\"name\":\"worker-1\","));
  EXPECT_THAT(node_json, HasSubstr("\"up\":true"));
  EXPECT_THAT(node_json, ::testing::Not(HasSubstr("\"up\":false")));
  std::string targets = ReadFile(o.data_dir + "/prometheus_targets.json");
  EXPECT_THAT(targets, HasSubstr("\"process\":\"lumend\""));
  EXPECT_THAT(targets, HasSubstr("\"process\":\"worker-1\""));
  EXPECT_THAT(ReadFile(bin + "/coordinator.args"),
              HasSubstr("--worker-sockets " + o.data_dir + "/run/worker-0.sock," + o.data_dir +
                        "/run/worker-1.sock"));
  // The metrics endpoint is up on the port in node.json.
  std::string metrics_address = (*node)->info().metrics_address;
  EXPECT_THAT(metrics_address, ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(metrics_address, "127.0.0.1:0");

  std::vector<ProcessStatus> procs = (*node)->Snapshot();
  absl::Time begin = absl::Now();
  (*node)->RequestStop();
  run.join();
  EXPECT_LT(absl::Now() - begin, absl::Seconds(3));
  for (const ProcessStatus& p : procs) {
    EXPECT_TRUE(kill(p.pid, 0) != 0 && errno == ESRCH) << p.name << " still running";
  }
  node_json = ReadFile(o.data_dir + "/node.json");
  EXPECT_THAT(node_json, ::testing::Not(HasSubstr("\"up\":true")));
  EXPECT_FALSE(FileExists(o.socket));
  EXPECT_FALSE(FileExists(o.data_dir + "/run/memstore.sock"));
  EXPECT_FALSE(FileExists(o.data_dir + "/run/worker-0.sock"));
  EXPECT_FALSE(FileExists(o.data_dir + "/lumend.lock"));
  EXPECT_THAT(ReadFile(o.data_dir + "/logs/worker-0.log"), HasSubstr("=== lumend: starting"));
}

TEST(NodeTest, MissingBinariesFailCreate) {
  NodeOptions o;
  o.data_dir = TestDir("node-missing");
  o.socket = o.data_dir + "/lumend.sock";
  o.bin_dir = o.data_dir + "/no-bin";
  auto node = Node::Create(o, nullptr, "/x/lumend");
  ASSERT_FALSE(node.ok());
  EXPECT_THAT(node.status().message(), HasSubstr("cannot find the executables of memstore"));
}

}  // namespace
}  // namespace lumen
