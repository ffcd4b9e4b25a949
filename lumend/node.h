// The Lumen-specific half of lumend: the data-directory lock, where the child binaries are,
// their command lines, node.json / prometheus_targets.json, and lumend's own metrics. The
// process supervision itself is lumend/supervisor.h.
#ifndef LUMEN_LUMEND_NODE_H_
#define LUMEN_LUMEND_NODE_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/node_options.h"
#include "lumend/supervisor.h"


namespace lumen {

// Creates the data directory and its logs/ and run/ subdirectories (like mkdir -p).
absl::Status PrepareDataDir(const std::string& data_dir);

// An exclusive flock on <data_dir>/lumend.lock holding our pid: one lumend per data directory.
// Thread-compatible.
class DataDirLock {
 public:
  // FailedPrecondition "another lumend (pid N) is using data directory D" when another open
  // file description holds the lock (another process, or another Acquire in this one).
  static absl::StatusOr<std::unique_ptr<DataDirLock>> Acquire(const std::string& data_dir);
  // Deletes the lock file, then releases the lock.
  ~DataDirLock();

  DataDirLock(const DataDirLock&) = delete;
  DataDirLock& operator=(const DataDirLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  DataDirLock(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  const std::string path_;
  const int fd_;
};

// Sends glog output to `log_file` (appending; no per-severity files or symlinks) and to
// stderr. Call once, before any logging, from main.
void InitLumendLogging(const char* argv0, const std::string& log_file);

// A free TCP port on 127.0.0.1 (bind to port 0, read it, close). Another process may take it
// before the caller binds it; the window is small on one node.
absl::StatusOr<int> PickFreePort();

// Absolute paths of the child executables.
struct ChildBinaries {
  std::string memstore;
  std::string worker;       // the CPU device's
  std::string coordinator;
  // The worker linked with the CUDA device (--device cuda); empty when this build has none
  // (it was made without the CUDA toolkit).
  std::string worker_cuda;
};

// Looks for the binaries in `bin_dir` if non-empty; else in the Bazel runfiles of `self_exe`
// (<self_exe>.runfiles/lumen/memstore/memstore, then $RUNFILES_DIR/lumen/...), else next to
// `self_exe` (the install layout). NotFound lists every path tried; a missing worker_cuda
// (worker/worker_cuda in runfiles) is not an error.
absl::StatusOr<ChildBinaries> FindChildBinaries(const std::string& bin_dir,
                                                const std::string& self_exe);

// With --device cuda, asks each worker whether it can drive its GPU before the node starts:
// runs `<worker_exe> --probe --device cuda --id I --device-memory B` (worker_exe is
// ChildBinaries::worker_cuda; empty: this build has no CUDA) for every worker I and
// returns their answers, prefixed "worker-I: " ("worker-0: NVIDIA ... (sm_90, 79.2 GiB),
// budget N bytes").
// FAILED_PRECONDITION quoting the worker when one cannot (this build has no CUDA, no driver,
// fewer GPUs than --workers), so lumend refuses to start instead of restarting workers that
// cannot run; a probe that has not answered within `timeout` is killed and named. Empty for
// the CPU device.
absl::StatusOr<std::vector<std::string>> ProbeWorkerDevices(
    const NodeOptions& options, const std::string& worker_exe,
    absl::Duration timeout = absl::Seconds(60));

// The metrics port of each child.
struct ChildPorts {
  int memstore = 0;
  std::vector<int> workers;  // one per worker
  int coordinator = 0;
};

// The children of a node, in start order: memstore, worker-0..N-1, coordinator. Their flags
// are the contract with the memstore, worker and coordinator binaries.
std::vector<ChildSpec> BuildChildSpecs(const NodeOptions& options, const ChildBinaries& bins,
                                       const ChildPorts& ports);

// Identity of the lumend process for node.json and the Prometheus targets.
struct LumendInfo {
  std::string data_dir;
  std::string socket;  // the client socket
  pid_t pid = 0;
  std::string metrics_address;  // "127.0.0.1:P"
};

// node.json: {"data_dir", "socket", "lumend_pid", "lumend_metrics_address", "processes":[...]}.
std::string NodeStatusJson(const LumendInfo& lumend, const std::vector<ProcessStatus>& procs);

// Prometheus file_sd targets, one per process plus lumend itself, with labels process and
// job="lumen".
std::string PrometheusTargetsJson(const LumendInfo& lumend,
                                  const std::vector<ProcessStatus>& procs);

// Writes `contents` to `path` via a temporary file in the same directory and rename(2), so
// readers see the old or the new file, never a partial one.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

// One node: the supervisor over its children, node.json and lumend's metrics endpoint.
// Start(), Run() and the destructor on one thread; RequestStop() from anywhere, including a
// signal handler.
class Node {
 public:
  // Picks ports, finds binaries and starts the metrics endpoint. `lock` must be the lock of
  // options.data_dir; the Node releases it when Run() returns. `self_exe` is lumend's path.
  static absl::StatusOr<std::unique_ptr<Node>> Create(const NodeOptions& options,
                                                      std::unique_ptr<DataDirLock> lock,
                                                      const std::string& self_exe,
                                                      SupervisorOptions supervisor_options = {});
  ~Node();

  // Starts every child and writes node.json and prometheus_targets.json.
  absl::Status Start();
  // Supervises until RequestStop(); then stops the children, marks them down in node.json
  // and releases the data-directory lock.
  absl::Status Run();
  void RequestStop() { supervisor_->RequestStop(); }

  // The line lumend prints once the children are started.
  std::string ServingLine() const;
  const LumendInfo& info() const { return info_; }
  std::vector<ProcessStatus> Snapshot() const { return supervisor_->Snapshot(); }

 private:
  class Metrics;
  Node() = default;
  void OnChange(const std::vector<ProcessStatus>& procs);

  NodeOptions options_;
  LumendInfo info_;
  std::unique_ptr<DataDirLock> lock_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Supervisor> supervisor_;
};

// Makes SIGTERM and SIGINT call node->RequestStop() (the handler only writes to a pipe) and
// ignores SIGPIPE. `node` must outlive the process's signal handling.
void StopOnSignals(Node* node);

}  // namespace lumen

#endif  // LUMEN_LUMEND_NODE_H_
