#include "lumend/node.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <exception>
#include <map>
#include <set>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/cpus.h"
#include "common/json.h"
#include "common/paths.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace lumen {
namespace {

absl::Status ErrnoError(const std::string& what) {
  int err = errno;
  std::string message = absl::StrCat(what, ": ", strerror(err));
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  if (err == ENOENT) return absl::NotFoundError(message);
  return absl::InternalError(message);
}

absl::Status MakeDirs(const std::string& path) {
  std::string partial;
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos == path.size() || path[pos] == '/') {
      partial = path.substr(0, pos);
      if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoError(absl::StrCat("cannot create directory ", partial));
      }
    }
  }
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(path.c_str(), X_OK) == 0;
}

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}


}  // namespace

absl::Status PrepareDataDir(const std::string& data_dir) {
  RETURN_IF_ERROR(MakeDirs(data_dir));
  RETURN_IF_ERROR(MakeDirs(data_dir + "/logs"));
  RETURN_IF_ERROR(MakeDirs(data_dir + "/run"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DataDirLock>> DataDirLock::Acquire(const std::string& data_dir) {
  const std::string path = data_dir + "/lumend.lock";
  // The previous holder deletes the file before it unlocks; if we locked a file that has
  // since been deleted or replaced, try again with the new one.
  for (int attempt = 0; attempt < 10; ++attempt) {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoError(absl::StrCat("cannot open lock file ", path));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      char buf[32] = {};
      ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
      close(fd);
      if (err != EWOULDBLOCK) {
        errno = err;
        return ErrnoError(absl::StrCat("cannot lock ", path));
      }
      int pid = 0;
      std::string pid_text = n > 0 ? std::string(absl::StripAsciiWhitespace(buf)) : "";
      if (!absl::SimpleAtoi(pid_text, &pid)) pid_text = "unknown";
      return absl::FailedPreconditionError(absl::StrCat(
          "another lumend (pid ", pid_text, ") is using data directory ", data_dir,
          " (lock file ", path, "); stop it first or use another --data-dir"));
    }
    struct stat by_fd;
    struct stat by_path;
    if (fstat(fd, &by_fd) == 0 && stat(path.c_str(), &by_path) == 0 &&
        by_fd.st_ino == by_path.st_ino && by_fd.st_dev == by_path.st_dev) {
      std::string pid = absl::StrCat(getpid(), "\n");
      if (ftruncate(fd, 0) != 0 || pwrite(fd, pid.data(), pid.size(), 0) < 0) {
        absl::Status s = ErrnoError(absl::StrCat("cannot write pid to ", path));
        close(fd);
        return s;
      }
      return std::unique_ptr<DataDirLock>(new DataDirLock(path, fd));
    }
    close(fd);
  }
  return absl::UnavailableError(absl::StrCat("lock file ", path, " keeps changing; retry"));
}

DataDirLock::~DataDirLock() {
  unlink(path_.c_str());
  close(fd_);
}

void InitLumendLogging(const char* argv0, const std::string& log_file) {
  FLAGS_timestamp_in_logfile_name = false;
  FLAGS_alsologtostderr = true;
  FLAGS_logbufsecs = 0;
  google::InitGoogleLogging(argv0);
  google::SetLogDestination(google::GLOG_INFO, log_file.c_str());
  for (google::LogSeverity s : {google::GLOG_WARNING, google::GLOG_ERROR, google::GLOG_FATAL}) {
    google::SetLogDestination(s, "");  // their lines go to the INFO file too
  }
  for (google::LogSeverity s :
       {google::GLOG_INFO, google::GLOG_WARNING, google::GLOG_ERROR, google::GLOG_FATAL}) {
    google::SetLogSymlink(s, "");
  }
}

absl::StatusOr<int> PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoError("socket");
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    absl::Status s = ErrnoError("cannot bind a free port on 127.0.0.1");
    close(fd);
    return s;
  }
  close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

absl::StatusOr<ChildBinaries> FindChildBinaries(const std::string& bin_dir,
                                                const std::string& self_exe) {
  // Candidate directories holding "<name>/<name>" (runfiles) or "<name>" (flat).
  struct Layout {
    std::string dir;
    bool nested;
  };
  std::vector<Layout> layouts;
  if (!bin_dir.empty()) {
    layouts.push_back({bin_dir, false});
  } else {
    layouts.push_back({self_exe + ".runfiles/lumen", true});
    const char* runfiles = getenv("RUNFILES_DIR");
    if (runfiles != nullptr && *runfiles != '\0') {
      layouts.push_back({absl::StrCat(runfiles, "/lumen"), true});
    }
    layouts.push_back({Dirname(self_exe), false});
  }
  ChildBinaries bins;
  std::vector<std::string> missing;
  for (auto [name, out] : {std::pair<const char*, std::string*>{"memstore", &bins.memstore},
                           {"worker", &bins.worker},
                           {"coordinator", &bins.coordinator}}) {
    std::vector<std::string> tried;
    for (const Layout& l : layouts) {
      std::string path = l.nested ? absl::StrCat(l.dir, "/", name, "/", name)
                                  : absl::StrCat(l.dir, "/", name);
      if (IsExecutableFile(path)) {
        *out = path;
        break;
      }
      tried.push_back(path);
    }
    if (out->empty()) {
      missing.push_back(absl::StrCat(name, " (tried ", absl::StrJoin(tried, ", "), ")"));
    }
  }
  if (!missing.empty()) {
    return absl::NotFoundError(absl::StrCat("cannot find the executables of ",
                                            absl::StrJoin(missing, "; "),
                                            "; build them or pass --bin-dir"));
  }
  // Optional: only builds made with the CUDA toolkit have it.
  for (const Layout& l : layouts) {
    std::string path = l.nested ? absl::StrCat(l.dir, "/worker/worker_cuda")
                                : absl::StrCat(l.dir, "/worker_cuda");
    if (IsExecutableFile(path)) {
      bins.worker_cuda = path;
      break;
    }
  }
  return bins;
}

std::vector<ChildSpec> BuildChildSpecs(const NodeOptions& o, const ChildBinaries& bins,
                                       const ChildPorts& ports) {
  const std::string& d = o.data_dir;
  const std::string logs = d + "/logs/";
  const std::string memstore_socket = d + "/run/memstore.sock";
  auto metrics = [](int port) { return absl::StrCat("127.0.0.1:", port); };
  std::vector<ChildSpec> specs;

  ChildSpec memstore;
  memstore.name = "memstore";
  memstore.argv = {bins.memstore,      "--data-dir",         d,
                   "--socket",         memstore_socket,      "--metrics-address",
                   metrics(ports.memstore), "--host-memory", absl::StrCat(o.host_memory_bytes)};
  for (const NvmeDir& nvme : o.nvme_dirs) {
    memstore.argv.push_back("--nvme-dir");
    memstore.argv.push_back(nvme.ToFlag());
  }
  memstore.log_file = logs + "memstore.log";
  memstore.sockets = {memstore_socket};
  memstore.metrics_address = metrics(ports.memstore);
  specs.push_back(std::move(memstore));

  std::vector<std::string> worker_sockets;
  for (int i = 0; i < o.workers; ++i) {
    ChildSpec w;
    w.name = absl::StrCat("worker-", i);
    std::string socket = absl::StrCat(d, "/run/worker-", i, ".sock");
    int port = i < static_cast<int>(ports.workers.size()) ? ports.workers[i] : 0;
    w.argv = {o.device == DeviceKind::kCuda ? bins.worker_cuda : bins.worker,
              "--data-dir",
              d,
              "--id",
              absl::StrCat(i),
              "--socket",
              socket,
              "--metrics-address",
              metrics(port),
              "--device",
              std::string(DeviceKindName(o.device)),
              "--device-memory",
              absl::StrCat(o.device_memory_bytes),
              "--memstore-socket",
              memstore_socket,
              "--optimizer-state-tier",
              o.optimizer_state_tier,
              "--optimizer-overlap",
              o.optimizer_overlap,
              "--link-gbps",
              absl::StrCat(o.link_gbps)};
    // Workers run jobs side by side: a share of the cores each (a CPU device's kernels, a GPU
    // worker's host AdamW for streamed jobs), rather than every worker a pool of all of them.
    if (o.workers > 1) {
      w.argv.push_back("--threads");
      w.argv.push_back(absl::StrCat(std::max(1, UsableCpus() / o.workers)));
    }
    w.log_file = logs + w.name + ".log";
    w.sockets = {socket};
    w.metrics_address = metrics(port);
    worker_sockets.push_back(socket);
    specs.push_back(std::move(w));
  }

  ChildSpec c;
  c.name = "coordinator";
  c.argv = {bins.coordinator, "--data-dir", d, "--socket", o.socket};
  if (!o.listen.empty()) {
    c.argv.push_back("--listen");
    c.argv.push_back(o.listen);
  }
  for (std::string arg : {std::string("--metrics-address"), metrics(ports.coordinator),
                          std::string("--worker-sockets"), absl::StrJoin(worker_sockets, ","),
                          std::string("--memstore-socket"), memstore_socket,
                          std::string("--node-status"), d + "/node.json",
                          std::string("--device"), std::string(DeviceKindName(o.device))}) {
    c.argv.push_back(std::move(arg));
  }
  c.log_file = logs + "coordinator.log";
  c.sockets = {o.socket};
  c.metrics_address = metrics(ports.coordinator);
  specs.push_back(std::move(c));
  return specs;
}

std::string NodeStatusJson(const LumendInfo& lumend, const std::vector<ProcessStatus>& procs) {
  std::vector<std::string> entries;
  for (const ProcessStatus& p : procs) {
    std::string start_time = p.start_time == absl::InfinitePast()
                                 ? "null"
                                 : absl::StrFormat("%.3f", absl::ToDoubleSeconds(
                                                               p.start_time - absl::UnixEpoch()));
    entries.push_back(absl::StrCat(
        "    {\"name\":", JsonQuote(p.name), ",\"pid\":", p.pid,
        ",\"up\":", p.up ? "true" : "false", ",\"restarts\":", p.restarts,
        ",\"start_time\":", start_time, ",\"last_exit\":", JsonQuote(p.last_exit),
        ",\"metrics_address\":", JsonQuote(p.metrics_address),
        ",\"log_file\":", JsonQuote(p.log_file),
        ",\"socket\":", JsonQuote(p.sockets.empty() ? "" : p.sockets[0]), "}"));
  }
  return absl::StrCat("{\n  \"data_dir\":", JsonQuote(lumend.data_dir),
                      ",\n  \"socket\":", JsonQuote(lumend.socket),
                      ",\n  \"lumend_pid\":", lumend.pid,
                      ",\n  \"lumend_metrics_address\":", JsonQuote(lumend.metrics_address),
                      ",\n  \"processes\":[\n", absl::StrJoin(entries, ",\n"), "\n  ]\n}\n");
}

std::string PrometheusTargetsJson(const LumendInfo& lumend,
                                  const std::vector<ProcessStatus>& procs) {
  auto entry = [](const std::string& address, const std::string& process) {
    return absl::StrCat("  {\"targets\":[", JsonQuote(address), "],\"labels\":{\"process\":",
                        JsonQuote(process), ",\"job\":\"lumen\"}}");
  };
  std::vector<std::string> entries = {entry(lumend.metrics_address, "lumend")};
  for (const ProcessStatus& p : procs) {
    if (!p.metrics_address.empty()) entries.push_back(entry(p.metrics_address, p.name));
  }
  return absl::StrCat("[\n", absl::StrJoin(entries, ",\n"), "\n]\n");
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(absl::StrCat("cannot create ", tmp));
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      absl::Status s = ErrnoError(absl::StrCat("cannot write ", tmp));
      close(fd);
      unlink(tmp.c_str());
      return s;
    }
    done += n;
  }
  if (close(fd) != 0) {
    absl::Status s = ErrnoError(absl::StrCat("cannot write ", tmp));
    unlink(tmp.c_str());
    return s;
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = ErrnoError(absl::StrCat("cannot rename ", tmp, " to ", path));
    unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

// lumend's Prometheus metrics, labelled by process. Used on the supervisor's run thread only.
class Node::Metrics {
 public:
  explicit Metrics(prometheus::Registry& registry)
      : up_(prometheus::BuildGauge()
                .Name("lumen_process_up")
                .Help("1 while the process is running, 0 while it is down")
                .Register(registry)),
        restarts_(prometheus::BuildCounter()
                      .Name("lumen_process_restarts_total")
                      .Help("Times lumend restarted the process after it exited")
                      .Register(registry)),
        start_time_(prometheus::BuildGauge()
                        .Name("lumen_process_start_time_seconds")
                        .Help("Unix time the process was last started")
                        .Register(registry)) {}

  void Update(const std::string& name, bool up, int restarts, absl::Time start_time) {
    up_.Add({{"process", name}}).Set(up ? 1 : 0);
    int& counted = restarts_counted_[name];
    prometheus::Counter& counter = restarts_.Add({{"process", name}});
    if (restarts > counted) counter.Increment(restarts - counted);
    counted = restarts;
    if (start_time != absl::InfinitePast()) {
      start_time_.Add({{"process", name}})
          .Set(absl::ToDoubleSeconds(start_time - absl::UnixEpoch()));
    }
  }

 private:
  prometheus::Family<prometheus::Gauge>& up_;
  prometheus::Family<prometheus::Counter>& restarts_;
  prometheus::Family<prometheus::Gauge>& start_time_;
  std::map<std::string, int> restarts_counted_;
};

absl::StatusOr<std::vector<std::string>> ProbeWorkerDevices(const NodeOptions& options,
                                                            const std::string& worker_exe,
                                                            absl::Duration timeout) {
  std::vector<std::string> answers;
  if (options.device != DeviceKind::kCuda) return answers;
  if (worker_exe.empty()) {
    return absl::FailedPreconditionError(
        "--device cuda: this build of Lumen has no CUDA worker (worker_cuda): it was built on a "
        "machine without the CUDA toolkit (/usr/local/cuda). Rebuild where nvcc is installed, "
        "or use --device cpu");
  }
  for (int i = 0; i < options.workers; ++i) {
    std::vector<std::string> args = {worker_exe,
                                     "--probe",
                                     "--device",
                                     std::string(DeviceKindName(options.device)),
                                     "--id",
                                     absl::StrCat(i),
                                     "--device-memory",
                                     absl::StrCat(options.device_memory_bytes)};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
      return absl::InternalError(absl::StrCat("pipe: ", strerror(errno)));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, worker_exe.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (rc != 0) {
      close(fds[0]);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot run ", worker_exe, ": ", strerror(rc)));
    }
    // A probe opens the GPU (a second or so); one that hangs (a wedged driver) is killed.
    const absl::Time deadline = absl::Now() + timeout;
    std::string output;
    bool timed_out = false;
    char buf[4096];
    for (;;) {
      pollfd pfd{fds[0], POLLIN, 0};
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left_ms <= 0) {
        timed_out = true;
        break;
      }
      const int ready = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ms, 1000)));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) continue;
      const ssize_t n = read(fds[0], buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      output.append(buf, n);
    }
    close(fds[0]);
    if (timed_out) kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (timed_out) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--device cuda: worker-", i, "'s probe of GPU ", i, " did not answer within ",
          absl::FormatDuration(timeout), " (is the driver hung? nvidia-smi should say)"));
    }
    const std::string answer(absl::StripAsciiWhitespace(output));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--device cuda: worker-", i, " cannot drive GPU ", i, ": ",
          answer.empty() ? absl::StrCat("the probe ", absl::StrJoin(args, " "),
                                        " failed without saying why")
                         : answer));
    }
    answers.push_back(absl::StrCat("worker-", i, ": ", answer));
  }
  return answers;
}

absl::StatusOr<std::unique_ptr<Node>> Node::Create(const NodeOptions& options,
                                                   std::unique_ptr<DataDirLock> lock,
                                                   const std::string& self_exe,
                                                   SupervisorOptions supervisor_options) {
  std::unique_ptr<Node> node(new Node());
  node->options_ = options;
  node->lock_ = std::move(lock);
  node->info_.data_dir = options.data_dir;
  node->info_.socket = options.socket;
  node->info_.pid = getpid();

  ASSIGN_OR_RETURN(ChildBinaries bins, FindChildBinaries(options.bin_dir, self_exe));
  ASSIGN_OR_RETURN(std::vector<std::string> devices,
                   ProbeWorkerDevices(options, bins.worker_cuda));
  for (const std::string& d : devices) LOG(INFO) << d;

  // Distinct free ports for the children's metrics endpoints.
  std::set<int> used;
  auto pick = [&used]() -> absl::StatusOr<int> {
    for (int attempt = 0; attempt < 20; ++attempt) {
      ASSIGN_OR_RETURN(int port, PickFreePort());
      if (used.insert(port).second) return port;
    }
    return absl::UnavailableError("cannot find distinct free ports on 127.0.0.1");
  };
  ChildPorts ports;
  ASSIGN_OR_RETURN(ports.memstore, pick());
  for (int i = 0; i < options.workers; ++i) {
    ASSIGN_OR_RETURN(int port, pick());
    ports.workers.push_back(port);
  }
  ASSIGN_OR_RETURN(ports.coordinator, pick());

  absl::StatusOr<std::unique_ptr<MetricsServer>> metrics_server =
      MetricsServer::Create(options.metrics_address);
  if (!metrics_server.ok()) {
    return absl::UnavailableError(absl::StrCat("--metrics-address ", options.metrics_address,
                                               ": ", metrics_server.status().message()));
  }
  node->metrics_server_ = std::move(*metrics_server);
  node->metrics_ = std::make_unique<Metrics>(node->metrics_server_->registry());
  node->info_.metrics_address = node->metrics_server_->address();

  Node* raw = node.get();
  auto user_on_change = std::move(supervisor_options.on_change);
  supervisor_options.on_change = [raw, user_on_change](const std::vector<ProcessStatus>& p) {
    raw->OnChange(p);
    if (user_on_change) user_on_change(p);
  };
  ASSIGN_OR_RETURN(node->supervisor_,
                   Supervisor::Create(BuildChildSpecs(options, bins, ports),
                                      std::move(supervisor_options)));
  LOG(INFO) << "lumend (pid " << node->info_.pid << ") on data directory " << options.data_dir
            << ", metrics on " << node->info_.metrics_address;
  return node;
}

Node::~Node() = default;

void Node::OnChange(const std::vector<ProcessStatus>& procs) {
  metrics_->Update("lumend", true, 0, absl::Now());
  for (const ProcessStatus& p : procs) metrics_->Update(p.name, p.up, p.restarts, p.start_time);
  absl::Status s = WriteFileAtomically(options_.data_dir + "/node.json",
                                       NodeStatusJson(info_, procs));
  if (!s.ok()) LOG(ERROR) << "cannot update node status: " << s;
}

absl::Status Node::Start() {
  RETURN_IF_ERROR(WriteFileAtomically(options_.data_dir + "/prometheus_targets.json",
                                      PrometheusTargetsJson(info_, supervisor_->Snapshot())));
  return supervisor_->Start();
}

absl::Status Node::Run() {
  absl::Status s = supervisor_->Run();
  metrics_server_.reset();
  lock_.reset();
  LOG(INFO) << "lumend stopped";
  return s;
}

std::string Node::ServingLine() const {
  return absl::StrCat("lumend: serving on ", options_.socket, " (data dir ", options_.data_dir,
                      ")");
}

namespace {
std::atomic<Node*> g_signal_node{nullptr};

void HandleStopSignal(int) {
  int saved = errno;
  Node* node = g_signal_node.load();
  if (node != nullptr) node->RequestStop();
  errno = saved;
}
}  // namespace

void StopOnSignals(Node* node) {
  g_signal_node.store(node);
  struct sigaction sa = {};
  sa.sa_handler = HandleStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

}  // namespace lumen
