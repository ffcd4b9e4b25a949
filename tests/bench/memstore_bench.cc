// Memstore data-plane benchmarks. Each benchmark prints one JSON object on its own line on
// stdout (progress and UCX transport descriptions go to stderr).
//
//   bazel run //tests/bench:memstore_bench                  # all benchmarks (.bazelrc has -O2)
//   bazel run //tests/bench:memstore_bench -- read_rma      # those whose name contains it
//
// The UCX benchmarks run the memstore side in a separate process (this binary re-executed with
// --serve), as on a real node: it creates the region, serves it with UcxServer and hands the
// UcxEndpointInfo over a pipe. The client reads 64 MiB tensors into a pre-faulted buffer and is
// compared with single-thread memcpy of the same size between pre-faulted buffers, in the same
// run. To add a benchmark (e.g. NVMe), write a function returning its JSON line and add it to
// kBenchmarks.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "memstore/host_arena.h"
#include "memstore/tensor_store.h"
#include "memstore/ucx_endpoint_pipe.h"
#include "memstore/ucx_transport.h"

namespace lumen {
namespace {

constexpr size_t kTensorBytes = 64 << 20;
constexpr int kTensorsInRegion = 4;  // Reads rotate over them, so no read hits a warm cache.
constexpr int kWarmups = 2;
constexpr int kMaxReps = 20;
constexpr int kMinReps = 3;
constexpr double kMaxSecondsPerMeasurement = 5.0;  // Slow paths stop early (kMinReps at least).
constexpr double kTargetRatio = 0.8;
constexpr char kServeFlag[] = "--serve";

// ---- Small helpers. -------------------------------------------------------------------------

// A pre-faulted, page-aligned buffer (first touch here costs ~1 GB/s; we measure copies).
struct Buffer {
  explicit Buffer(size_t bytes) : data(static_cast<uint8_t*>(aligned_alloc(4096, bytes))) {
    memset(data, 0x11, bytes);
  }
  ~Buffer() { free(data); }
  uint8_t* const data;
};

// Runs `op` kWarmups times, then up to kMaxReps times (stopping after
// kMaxSecondsPerMeasurement once kMinReps are done); returns the median in GB/s (1e9 bytes).
absl::StatusOr<double> MedianGbps(size_t bytes, const std::function<absl::Status(int)>& op) {
  for (int i = 0; i < kWarmups; ++i) RETURN_IF_ERROR(op(i));
  std::vector<double> gbps;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kMaxReps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(op(i));
    const auto t1 = std::chrono::steady_clock::now();
    gbps.push_back(bytes / std::chrono::duration<double>(t1 - t0).count() / 1e9);
    if (gbps.size() >= kMinReps &&
        std::chrono::duration<double>(t1 - start).count() > kMaxSecondsPerMeasurement) {
      break;
    }
  }
  std::sort(gbps.begin(), gbps.end());
  return gbps[gbps.size() / 2];
}

// Single-thread memcpy of kTensorBytes between pre-faulted buffers, rotating sources like the
// UCX reads do.
absl::StatusOr<double> MemcpyGbps() {
  Buffer src(kTensorBytes * kTensorsInRegion);
  Buffer dst(kTensorBytes);
  return MedianGbps(kTensorBytes, [&](int i) {
    memcpy(dst.data, src.data + (i % kTensorsInRegion) * kTensorBytes, kTensorBytes);
    return absl::OkStatus();
  });
}

// ---- The serving process. -------------------------------------------------------------------

enum class RegionKind {
  kHostArena,     // The memstore's arena: a HostArena over a region UCX allocated (as memstore
                  // main.cc builds it), so clients on the node can map it.
  kUcxAllocated,  // A bare region UCX allocates, without the arena.
};

// Child side: serves a region of kTensorsInRegion tensors until `stop_fd` reaches EOF.
int ServeMain(RegionKind kind, int info_fd, int stop_fd) {
  const size_t bytes = kTensorBytes * kTensorsInRegion;
  std::unique_ptr<HostArena> arena;
  absl::StatusOr<std::unique_ptr<UcxServer>> server;
  server = UcxServer::CreateWithAllocatedRegion(bytes);
  if (!server.ok()) {
    fprintf(stderr, "serve: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (kind == RegionKind::kHostArena) {
    auto created = HostArena::CreateOver((*server)->region(), bytes);
    if (!created.ok()) {
      fprintf(stderr, "serve: %s\n", created.status().ToString().c_str());
      return 1;
    }
    arena = std::move(created).value();
  }
  memset((*server)->region(), 0x5A, bytes);  // Pre-fault (the arena is already, UCX's maybe not).
  const UcxEndpointInfo& info = (*server)->info();
  if (!WriteEndpointInfo(info_fd, info)) {
    return 1;
  }
  close(info_fd);
  char byte;
  while (read(stop_fd, &byte, 1) > 0) {
  }
  return 0;
}

// Parent side: a serving child process, stopped and reaped on destruction.
class ServerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(RegionKind kind) {
    int info_pipe[2], stop_pipe[2];
    if (pipe(info_pipe) != 0 || pipe(stop_pipe) != 0) {
      return absl::InternalError(absl::StrCat("pipe: ", strerror(errno)));
    }
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", strerror(errno)));
    if (pid == 0) {
      close(info_pipe[0]);
      close(stop_pipe[1]);
      const std::string kind_arg = kind == RegionKind::kHostArena ? "arena" : "ucx";
      const std::string info_fd = std::to_string(info_pipe[1]);
      const std::string stop_fd = std::to_string(stop_pipe[0]);
      execl("/proc/self/exe", "memstore_bench", kServeFlag, kind_arg.c_str(), info_fd.c_str(),
            stop_fd.c_str(), static_cast<char*>(nullptr));
      fprintf(stderr, "exec /proc/self/exe: %s\n", strerror(errno));
      _exit(127);
    }
    close(info_pipe[1]);
    close(stop_pipe[0]);
    auto process = std::unique_ptr<ServerProcess>(new ServerProcess(pid, stop_pipe[1]));
    UcxEndpointInfo& info = process->info_;
    const bool ok = ReadEndpointInfo(info_pipe[0], &info);
    close(info_pipe[0]);
    if (!ok) {
      return absl::InternalError("the serving process exited before sending its endpoint info");
    }
    return process;
  }

  ~ServerProcess() {
    close(stop_fd_);
    int status = 0;
    waitpid(pid_, &status, 0);
  }

  const UcxEndpointInfo& info() const { return info_; }

 private:
  ServerProcess(pid_t pid, int stop_fd) : pid_(pid), stop_fd_(stop_fd) {}
  const pid_t pid_;
  const int stop_fd_;
  UcxEndpointInfo info_;
};

// ---- Benchmarks. ----------------------------------------------------------------------------

// One UCX read benchmark: 64 MiB Gets from a serving process, against memcpy in the same run.
absl::StatusOr<std::string> UcxRead(const std::string& name, RegionKind kind,
                                    bool use_direct_pointer) {
  ASSIGN_OR_RETURN(std::unique_ptr<ServerProcess> server, ServerProcess::Start(kind));
  UcxClientOptions options;
  options.use_direct_pointer = use_direct_pointer;
  ASSIGN_OR_RETURN(std::unique_ptr<UcxClient> client, UcxClient::Create(options));
  RETURN_IF_ERROR(client->Connect(server->info()));
  fprintf(stderr, "%s: direct pointer %d\n%s", name.c_str(), client->has_direct_pointer(),
          client->TransportDescription().c_str());
  Buffer dst(kTensorBytes);
  ASSIGN_OR_RETURN(const double ucx_gbps, MedianGbps(kTensorBytes, [&](int i) {
                     return client->Get((i % kTensorsInRegion) * kTensorBytes, dst.data,
                                        kTensorBytes);
                   }));
  if (dst.data[0] != 0x5A || dst.data[kTensorBytes - 1] != 0x5A) {
    return absl::InternalError(absl::StrCat(name, ": read bytes differ from the served ones"));
  }
  ASSIGN_OR_RETURN(const double memcpy_gbps, MemcpyGbps());
  const double ratio = ucx_gbps / memcpy_gbps;
  return absl::StrFormat(
      "{\"benchmark\":\"%s\",\"bytes\":%d,\"ucx_read_gbps\":%.3f,\"memcpy_gbps\":%.3f,"
      "\"ratio\":%.3f,\"target_ratio\":%.1f,\"meets_target\":%s,\"direct_pointer\":%s,"
      "\"region\":\"%s\"}",
      name, kTensorBytes, ucx_gbps, memcpy_gbps, ratio, kTargetRatio,
      ratio >= kTargetRatio ? "true" : "false", client->has_direct_pointer() ? "true" : "false",
      kind == RegionKind::kHostArena ? "host_arena" : "ucx_allocated");
}

// ---- NVMe tier against fio. ------------------------------------------------------------------

constexpr int64_t kNvmeBytes = int64_t{1} << 30;
constexpr double kNvmeTargetRatio = 0.9;

// Runs fio with the NVMe tier's I/O shape (1 MiB blocks, io_uring, queue depth 16, O_DIRECT,
// synced at the end as the tier syncs its pages) and returns its bandwidth in GB/s.
absl::StatusOr<double> FioGbps(const std::string& dir, const char* rw) {
  const std::string command = absl::StrCat(
      "/usr/bin/fio --name=lumen --directory=", dir, " --rw=", rw,
      " --bs=1M --iodepth=16 --ioengine=io_uring --direct=1 --size=", kNvmeBytes,
      " --end_fsync=1 --numjobs=1 --output-format=json 2>/dev/null");
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return absl::InternalError("cannot run fio");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  if (pclose(pipe) != 0) {
    return absl::UnavailableError(absl::StrCat("fio failed (is Debian's fio installed?): ",
                                               command));
  }
  // jobs[0].<read|write>.bw_bytes
  const size_t section = out.find(absl::StrCat("\"", rw == std::string("write") ? "write" : "read",
                                               "\" : {"));
  const size_t key = out.find("\"bw_bytes\" : ", section);
  if (section == std::string::npos || key == std::string::npos) {
    return absl::InternalError("cannot find bw_bytes in fio's JSON output");
  }
  return std::strtod(out.c_str() + key + 13, nullptr) / 1e9;
}

absl::StatusOr<std::string> NvmeBench() {
  const char* env = getenv("LUMEN_BENCH_NVME_DIR");
  const std::string dir = env != nullptr ? env : "/tmp/lumen-nvme-bench";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/fio");
  ASSIGN_OR_RETURN(const double fio_write, FioGbps(dir + "/fio", "write"));
  ASSIGN_OR_RETURN(const double fio_read, FioGbps(dir + "/fio", "read"));
  std::filesystem::remove_all(dir + "/fio");

  TensorStoreOptions options;
  options.db_path = dir + "/db";
  options.host_bytes = kNvmeBytes + (64 << 20);
  options.nvme_dirs = {{dir + "/nvme", 0}};
  ASSIGN_OR_RETURN(std::unique_ptr<UringNvmeIo> io, UringNvmeIo::Create({16, 1 << 20}));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::Open(options, std::move(io)));
  // As when a worker has put a tensor into a staging extent: time the commit to NVMe.
  ASSIGN_OR_RETURN(const int64_t staging, store->BeginWrite("bench", kNvmeBytes));
  memset(store->arena().data() + staging, 0x3C, kNvmeBytes);
  const auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(store->CommitWrite("bench", staging, kNvmeBytes, "u8", TIER_NVME));
  const auto t1 = std::chrono::steady_clock::now();
  // Read into a page-aligned buffer, verifying every page's checksum.
  ASSIGN_OR_RETURN(const int64_t dst, store->arena().Allocate(kNvmeBytes));
  const auto t2 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const int64_t got,
                   store->Read("bench", store->arena().data() + dst, kNvmeBytes));
  const auto t3 = std::chrono::steady_clock::now();
  if (got != kNvmeBytes || store->arena().data()[dst + kNvmeBytes - 1] != 0x3C) {
    return absl::InternalError("NVMe benchmark read back wrong bytes");
  }
  const double write_gbps = kNvmeBytes / std::chrono::duration<double>(t1 - t0).count() / 1e9;
  const double read_gbps = kNvmeBytes / std::chrono::duration<double>(t3 - t2).count() / 1e9;
  store.reset();
  std::filesystem::remove_all(dir);
  auto line = [](const char* what, double ours, double fio) {
    return absl::StrFormat(
        "{\"benchmark\":\"memstore_nvme_%s\",\"bytes\":%d,\"lumen_gbps\":%.3f,"
        "\"fio_gbps\":%.3f,\"ratio\":%.3f,\"target_ratio\":%.1f,\"meets_target\":%s}",
        what, kNvmeBytes, ours, fio, ours / fio, kNvmeTargetRatio,
        ours / fio >= kNvmeTargetRatio ? "true" : "false");
  };
  return absl::StrCat(line("write", write_gbps, fio_write), "\n",
                      line("read", read_gbps, fio_read));
}

struct Benchmark {
  const char* name;
  std::function<absl::StatusOr<std::string>()> run;
};

const std::vector<Benchmark>& Benchmarks() {
  static const auto* benchmarks = new std::vector<Benchmark>{
      // The memstore's arena as it is: the default client (direct pointer when UCX offers it).
      {"memstore_ucx_read",
       [] { return UcxRead("memstore_ucx_read", RegionKind::kHostArena, true); }},
      // The same region through ucp_get_nbx only (the path across nodes).
      {"memstore_ucx_read_rma",
       [] { return UcxRead("memstore_ucx_read_rma", RegionKind::kHostArena, false); }},
      // The NVMe tier against fio in the same directory (target >= 0.9x each way).
      {"memstore_nvme", [] { return NvmeBench(); }},
  };
  return *benchmarks;
}

}  // namespace
}  // namespace lumen

int main(int argc, char** argv) {
  if (argc == 5 && strcmp(argv[1], lumen::kServeFlag) == 0) {
    const auto kind = strcmp(argv[2], "arena") == 0 ? lumen::RegionKind::kHostArena
                                                     : lumen::RegionKind::kUcxAllocated;
    return lumen::ServeMain(kind, atoi(argv[3]), atoi(argv[4]));
  }
  const std::string filter = argc > 1 ? argv[1] : "";
  int failures = 0;
  for (const lumen::Benchmark& benchmark : lumen::Benchmarks()) {
    if (!filter.empty() && std::string(benchmark.name).find(filter) == std::string::npos) {
      continue;
    }
    absl::StatusOr<std::string> line = benchmark.run();
    if (line.ok()) {
      printf("%s\n", line->c_str());
      fflush(stdout);
    } else {
      fprintf(stderr, "%s failed: %s\n", benchmark.name, line.status().ToString().c_str());
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}
