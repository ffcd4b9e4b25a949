#include "common/node_options.h"

#include <stdlib.h>

#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<NodeOptions> Parse(std::initializer_list<std::string> args) {
  std::vector<std::string> storage = {"lumend"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<const char*> argv;
  for (const std::string& s : storage) argv.push_back(s.c_str());
  return ParseNodeOptions(static_cast<int>(argv.size()), argv.data());
}

std::string TmpDir() {
  const char* dir = getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

std::string WriteFile(const std::string& name, const std::string& contents) {
  std::string path = TmpDir() + "/" + name;
  std::ofstream(path) << contents;
  return path;
}

void ExpectInvalid(const absl::StatusOr<NodeOptions>& r, const std::string& fragment) {
  ASSERT_FALSE(r.ok()) << "expected an error containing: " << fragment;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(fragment));
}

class NodeOptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("LUMEN_HOME", "/srv/lumen-home", 1);
    unsetenv("LUMEN_SOCKET");
  }
};

TEST_F(NodeOptionsTest, Defaults) {
  absl::StatusOr<NodeOptions> o = Parse({});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->help_shown);
  EXPECT_EQ(o->data_dir, "/srv/lumen-home");
  EXPECT_EQ(o->socket, "/srv/lumen-home/lumend.sock");
  EXPECT_EQ(o->listen, "");
  EXPECT_EQ(o->workers, 1);
  EXPECT_EQ(o->device, DeviceKind::kCpu);
  EXPECT_EQ(o->device_memory_bytes, int64_t{1} << 30);
  EXPECT_EQ(o->host_memory_bytes, int64_t{1} << 30);
  EXPECT_TRUE(o->nvme_dirs.empty());
  EXPECT_EQ(o->metrics_address, "127.0.0.1:0");
  EXPECT_EQ(o->bin_dir, "");
  EXPECT_EQ(o->optimizer_overlap, "forward");
  o = Parse({"--optimizer-overlap", "backward"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->optimizer_overlap, "backward");
}

TEST_F(NodeOptionsTest, CudaDeviceMemoryDefaultsToTheWholeGpu) {
  absl::StatusOr<NodeOptions> o = Parse({"--device", "cuda"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->device_memory_bytes, 0);  // each worker's GPU decides
  o = Parse({"--device", "cpu"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->device_memory_bytes, int64_t{1} << 30);
}

TEST_F(NodeOptionsTest, EveryFlag) {
  absl::StatusOr<NodeOptions> o =
      Parse({"--data-dir", "/d", "--socket", "/s/c.sock", "--listen", "127.0.0.1:7000",
             "--workers", "3", "--device", "cuda", "--device-memory", "64MiB", "--host-memory",
             "2GiB", "--nvme-dir", "/nvme0", "--nvme-dir", "/nvme1:1TB", "--metrics-address",
             "127.0.0.1:9100", "--bin-dir", "/opt/lumen/bin"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->data_dir, "/d");
  EXPECT_EQ(o->socket, "/s/c.sock");
  EXPECT_EQ(o->listen, "127.0.0.1:7000");
  EXPECT_EQ(o->workers, 3);
  EXPECT_EQ(o->device, DeviceKind::kCuda);
  EXPECT_EQ(o->device_memory_bytes, 64 << 20);
  EXPECT_EQ(o->host_memory_bytes, int64_t{2} << 30);
  ASSERT_EQ(o->nvme_dirs.size(), 2u);
  EXPECT_EQ(o->nvme_dirs[0].path, "/nvme0");
  EXPECT_EQ(o->nvme_dirs[0].capacity_bytes, 0);
  EXPECT_EQ(o->nvme_dirs[0].ToFlag(), "/nvme0");
  EXPECT_EQ(o->nvme_dirs[1].path, "/nvme1");
  EXPECT_EQ(o->nvme_dirs[1].capacity_bytes, 1000000000000);
  EXPECT_EQ(o->nvme_dirs[1].ToFlag(), "/nvme1:1000000000000");
  EXPECT_EQ(o->metrics_address, "127.0.0.1:9100");
  EXPECT_EQ(o->bin_dir, "/opt/lumen/bin");
}

TEST_F(NodeOptionsTest, EqualsFormAndRelativePaths) {
  absl::StatusOr<NodeOptions> o = Parse({"--data-dir=/x/./y/..", "--bin-dir=/b/"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->data_dir, "/x");
  EXPECT_EQ(o->socket, "/x/lumend.sock");
  EXPECT_EQ(o->bin_dir, "/b");
  o = Parse({"--data-dir", "rel"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->data_dir[0], '/');
}

TEST_F(NodeOptionsTest, SocketFromEnvironment) {
  setenv("LUMEN_SOCKET", "/run/l.sock", 1);
  absl::StatusOr<NodeOptions> o = Parse({"--data-dir", "/d"});
  unsetenv("LUMEN_SOCKET");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->socket, "/run/l.sock");
}

TEST_F(NodeOptionsTest, ListenLoopbackOnly) {
  for (const char* ok : {"127.0.0.1:1", "localhost:65535", "[::1]:7000", "::1:7000"}) {
    EXPECT_TRUE(Parse({"--listen", ok}).ok()) << ok;
  }
  ExpectInvalid(Parse({"--listen", "0.0.0.0:7000"}), "TLS support");
  ExpectInvalid(Parse({"--listen", "10.1.2.3:7000"}), "non-loopback address 10.1.2.3");
  ExpectInvalid(Parse({"--listen", "example.com:80"}), "--listen \"example.com:80\"");
  ExpectInvalid(Parse({"--listen", "127.0.0.1"}), "expected host:port");
  ExpectInvalid(Parse({"--listen", "127.0.0.1:99999"}), "port");
  ExpectInvalid(Parse({"--listen", "[::1]7000"}), "expected [host]:port");
}

TEST_F(NodeOptionsTest, BadValues) {
  ExpectInvalid(Parse({"--workers", "0"}), "--workers \"0\": must be an integer from 1");
  ExpectInvalid(Parse({"--workers", "two"}), "--workers \"two\"");
  ExpectInvalid(Parse({"--device", "tpu"}), "--device \"tpu\": must be cpu or cuda");
  ExpectInvalid(Parse({"--device-memory", "lots"}), "--device-memory \"lots\"");
  ExpectInvalid(Parse({"--device-memory", "0"}), "greater than zero");
  ExpectInvalid(Parse({"--host-memory", "1QB"}), "--host-memory \"1QB\"");
  ExpectInvalid(Parse({"--nvme-dir", "/n:big"}), "--nvme-dir \"/n:big\": capacity");
  ExpectInvalid(Parse({"--nvme-dir", ":1GiB"}), "directory is empty");
  ExpectInvalid(Parse({"--metrics-address", "nope"}), "--metrics-address \"nope\"");
  ExpectInvalid(Parse({"--data-dir", ""}), "--data-dir");
  ExpectInvalid(Parse({"--socket", "/" + std::string(200, 's')}), "Unix socket path");
  ExpectInvalid(Parse({"--optimizer-overlap", "sideways"}),
                "--optimizer-overlap \"sideways\": must be forward or backward");
  ExpectInvalid(Parse({"--frobnicate"}), "--frobnicate");
  ExpectInvalid(Parse({"--workers"}), "--workers");
}

TEST_F(NodeOptionsTest, Help) {
  testing::internal::CaptureStdout();
  absl::StatusOr<NodeOptions> o = Parse({"--help"});
  std::string out = testing::internal::GetCapturedStdout();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->help_shown);
  EXPECT_THAT(out, HasSubstr("--device-memory"));
  EXPECT_THAT(out, HasSubstr("--nvme-dir"));
}

TEST_F(NodeOptionsTest, ConfigFile) {
  std::string file = WriteFile("node.yaml", R"(
data-dir: /from/file
listen: "[::1]:7001"
workers: 2
device: cuda
device_memory: 128MiB
host-memory: 4GiB
nvme-dir: [/n0, "/n1:2GiB"]
metrics-address: 127.0.0.1:9200
bin-dir: /file/bin
)");
  absl::StatusOr<NodeOptions> o = Parse({"--config", file});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config_file, file);
  EXPECT_EQ(o->data_dir, "/from/file");
  EXPECT_EQ(o->socket, "/from/file/lumend.sock");
  EXPECT_EQ(o->listen, "[::1]:7001");
  EXPECT_EQ(o->workers, 2);
  EXPECT_EQ(o->device, DeviceKind::kCuda);
  EXPECT_EQ(o->device_memory_bytes, 128 << 20);
  EXPECT_EQ(o->host_memory_bytes, int64_t{4} << 30);
  ASSERT_EQ(o->nvme_dirs.size(), 2u);
  EXPECT_EQ(o->nvme_dirs[1].capacity_bytes, int64_t{2} << 30);
  EXPECT_EQ(o->metrics_address, "127.0.0.1:9200");
  EXPECT_EQ(o->bin_dir, "/file/bin");

  std::string single = WriteFile("single.yaml", "nvme-dir: /only\n");
  o = Parse({"--config", single});
  ASSERT_TRUE(o.ok()) << o.status();
  ASSERT_EQ(o->nvme_dirs.size(), 1u);
  EXPECT_EQ(o->nvme_dirs[0].path, "/only");

  EXPECT_TRUE(Parse({"--config", WriteFile("empty.yaml", "")}).ok());
}

TEST_F(NodeOptionsTest, CommandLineOverridesConfigFile) {
  std::string file = WriteFile("override.yaml",
                               "workers: 2\ndevice-memory: 128MiB\nnvme-dir: [/a, /b]\n"
                               "data-dir: /from/file\n");
  absl::StatusOr<NodeOptions> o =
      Parse({"--workers", "5", "--config", file, "--nvme-dir", "/c"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->workers, 5);
  EXPECT_EQ(o->device_memory_bytes, 128 << 20);
  EXPECT_EQ(o->data_dir, "/from/file");
  ASSERT_EQ(o->nvme_dirs.size(), 1u);
  EXPECT_EQ(o->nvme_dirs[0].path, "/c");
}

TEST_F(NodeOptionsTest, ConfigFileErrors) {
  std::string unknown = WriteFile("unknown.yaml", "workers: 1\ngpus: 4\n");
  ExpectInvalid(Parse({"--config", unknown}), "unknown key \"gpus\" in node config file " +
                                                  unknown);
  std::string bad_value = WriteFile("bad_value.yaml", "workers: many\n");
  ExpectInvalid(Parse({"--config", bad_value}), "--workers \"many\"");
  std::string nested = WriteFile("nested.yaml", "workers: {a: 1}\n");
  ExpectInvalid(Parse({"--config", nested}), "key \"workers\" in node config file");
  std::string list = WriteFile("list.yaml", "- workers\n");
  ExpectInvalid(Parse({"--config", list}), "must be a YAML map");
  std::string broken = WriteFile("broken.yaml", "workers: [1\n");
  ExpectInvalid(Parse({"--config", broken}), "is not valid YAML");
  std::string nonloop = WriteFile("nonloop.yaml", "listen: 192.168.1.5:7000\n");
  ExpectInvalid(Parse({"--config", nonloop}), "TLS support");
  ExpectInvalid(Parse({"--config", TmpDir() + "/does-not-exist.yaml"}),
                "cannot read node config file " + TmpDir() + "/does-not-exist.yaml");
}

}  // namespace
}  // namespace lumen
