#include "lumend/supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"

namespace lumen {
namespace {

// Granularity of the fallback check for exited children when pidfd_open is unavailable.
constexpr absl::Duration kPollTick = absl::Milliseconds(200);

int PidfdOpen(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

// Marks every descriptor >= 3 close-on-exec, so a child inherits none of ours (in particular
// not the data-directory lock). Async-signal-safe.
void CloseOnExecAbove2() {
#ifdef SYS_close_range
  constexpr unsigned int kCloseRangeCloexec = 1u << 2;  // CLOSE_RANGE_CLOEXEC
  if (syscall(SYS_close_range, 3u, ~0u, kCloseRangeCloexec) == 0) return;
#endif
  for (int fd = 3; fd < 4096; ++fd) fcntl(fd, F_SETFD, FD_CLOEXEC);
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return absl::StrCat("killed by signal ", sig, name != nullptr ? absl::StrCat(" (SIG", name, ")") : "",
                        WCOREDUMP(status) ? ", core dumped" : "");
  }
  return absl::StrCat("wait status ", status);
}

void RemoveSockets(const std::vector<std::string>& sockets) {
  for (const std::string& path : sockets) {
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      PLOG(WARNING) << "cannot delete socket " << path;
    }
  }
}

void WriteAll(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t n = write(fd, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += n;
  }
}

}  // namespace

absl::Duration NextBackoff(const BackoffPolicy& policy, absl::Duration previous,
                           absl::Duration uptime) {
  if (previous <= absl::ZeroDuration() || uptime >= policy.reset_after) return policy.initial;
  return std::min(previous * 2, policy.max);
}

absl::StatusOr<std::unique_ptr<Supervisor>> Supervisor::Create(std::vector<ChildSpec> children,
                                                               SupervisorOptions options) {
  std::set<std::string> names;
  for (const ChildSpec& spec : children) {
    if (spec.name.empty() || !names.insert(spec.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("child names must be unique and non-empty; got \"", spec.name, "\""));
    }
    if (spec.argv.empty() || spec.argv[0].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("child \"", spec.name, "\" has no executable (argv is empty)"));
    }
  }
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", strerror(errno)));
  }
  return std::unique_ptr<Supervisor>(
      new Supervisor(std::move(children), std::move(options), fds[0], fds[1]));
}

Supervisor::Supervisor(std::vector<ChildSpec> children, SupervisorOptions options,
                       int wake_read, int wake_write)
    : options_(std::move(options)), wake_read_(wake_read), wake_write_(wake_write) {
  absl::MutexLock lock(&mu_);
  children_.resize(children.size());
  for (size_t i = 0; i < children.size(); ++i) children_[i].spec = std::move(children[i]);
}

Supervisor::~Supervisor() {
  // Run() was not called or did not finish: leave no process behind.
  absl::MutexLock lock(&mu_);
  for (Child& c : children_) {
    if (c.up) {
      kill(c.pid, SIGKILL);
      int status;
      while (waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
    if (c.pidfd >= 0) close(c.pidfd);
  }
  close(wake_read_);
  close(wake_write_);
}

void Supervisor::RequestStop() {
  stop_requested_.store(true);
  char byte = 1;
  // Non-blocking; a full pipe already holds a wake-up.
  ssize_t ignored = write(wake_write_, &byte, 1);
  (void)ignored;
}

std::vector<ProcessStatus> Supervisor::Snapshot() const {
  absl::MutexLock lock(&mu_);
  std::vector<ProcessStatus> out;
  out.reserve(children_.size());
  for (const Child& c : children_) {
    ProcessStatus s;
    s.name = c.spec.name;
    s.pid = c.pid;
    s.up = c.up;
    s.restarts = std::max(0, c.starts - 1);
    s.start_time = c.start_time;
    s.last_exit = c.last_exit;
    s.metrics_address = c.spec.metrics_address;
    s.log_file = c.spec.log_file;
    s.sockets = c.spec.sockets;
    out.push_back(std::move(s));
  }
  return out;
}

void Supervisor::NotifyChange() {
  if (options_.on_change) options_.on_change(Snapshot());
}

void Supervisor::StartChild(size_t index) {
  absl::MutexLock lock(&mu_);
  Child& c = children_[index];
  RemoveSockets(c.spec.sockets);

  int log_fd = -1;
  if (!c.spec.log_file.empty()) {
    log_fd = open(c.spec.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      PLOG(ERROR) << c.spec.name << ": cannot open log file " << c.spec.log_file
                  << "; the child inherits lumend's stdout/stderr";
    } else {
      WriteAll(log_fd, absl::StrCat("=== lumend: starting ", c.spec.name, " at ",
                                    absl::FormatTime(absl::Now()), ": ",
                                    absl::StrJoin(c.spec.argv, " "), "\n"));
    }
  }

  // Everything the child needs is prepared before fork: between fork and exec only
  // async-signal-safe calls are allowed (other threads may hold locks).
  std::vector<char*> argv;
  for (std::string& arg : c.spec.argv) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const std::string exec_failed =
      absl::StrCat("lumend: cannot execute ", c.spec.argv[0], " (errno ");
  const pid_t parent = getpid();

  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    if (log_fd >= 0) {
      dup2(log_fd, 1);
      dup2(log_fd, 2);
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);  // lumend died before prctl took effect
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig : {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD}) signal(sig, SIG_DFL);
    CloseOnExecAbove2();
    execv(argv[0], argv.data());
    int err = errno;
    char digits[16];
    int n = 0;
    do {
      digits[n++] = static_cast<char>('0' + err % 10);
      err /= 10;
    } while (err > 0 && n < 15);
    ssize_t ignored = write(2, exec_failed.data(), exec_failed.size());
    while (n > 0) ignored = write(2, &digits[--n], 1);
    ignored = write(2, ")\n", 2);
    (void)ignored;
    _exit(127);
  }
  if (log_fd >= 0) close(log_fd);

  absl::Time now = absl::Now();
  ++c.starts;
  c.start_time = now;
  c.restart_at = absl::InfiniteFuture();
  if (pid < 0) {
    c.up = false;
    c.last_exit = absl::StrCat("could not start: fork: ", strerror(errno));
    c.backoff = NextBackoff(options_.backoff, c.backoff, absl::ZeroDuration());
    c.restart_at = now + c.backoff;
    LOG(ERROR) << c.spec.name << ": " << c.last_exit << "; retrying in " << c.backoff;
    return;
  }
  c.pid = pid;
  c.up = true;
  c.pidfd = PidfdOpen(pid);
  LOG(INFO) << "started " << c.spec.name << " (pid " << pid << ")"
            << (c.starts > 1 ? absl::StrCat(", restart ", c.starts - 1) : "") << ": "
            << absl::StrJoin(c.spec.argv, " ");
}

bool Supervisor::ReapExited(bool stopping) {
  bool any = false;
  absl::MutexLock lock(&mu_);
  for (Child& c : children_) {
    if (!c.up) continue;
    int status = 0;
    pid_t r = waitpid(c.pid, &status, WNOHANG);
    if (r == 0 || (r < 0 && errno == EINTR)) continue;
    any = true;
    absl::Time now = absl::Now();
    absl::Duration uptime = now - c.start_time;
    c.up = false;
    c.last_exit = r < 0 ? absl::StrCat("lost (waitpid: ", strerror(errno), ")")
                        : DescribeWaitStatus(status);
    if (c.pidfd >= 0) {
      close(c.pidfd);
      c.pidfd = -1;
    }
    if (stopping) {
      LOG(INFO) << c.spec.name << " (pid " << c.pid << ") " << c.last_exit;
      continue;
    }
    c.backoff = NextBackoff(options_.backoff, c.backoff, uptime);
    c.restart_at = now + c.backoff;
    LOG(WARNING) << c.spec.name << " (pid " << c.pid << ") " << c.last_exit << " after "
                 << absl::Trunc(uptime, absl::Milliseconds(1)) << "; restarting in "
                 << c.backoff << " (restart " << c.starts << "); log: " << c.spec.log_file;
  }
  return any;
}

absl::Status Supervisor::Start() {
  size_t n;
  {
    absl::MutexLock lock(&mu_);
    n = children_.size();
  }
  for (size_t i = 0; i < n; ++i) StartChild(i);
  NotifyChange();
  return absl::OkStatus();
}

absl::Status Supervisor::Run() {
  while (!stop_requested_.load()) {
    std::vector<pollfd> fds;
    fds.push_back({wake_read_, POLLIN, 0});
    absl::Time now = absl::Now();
    absl::Duration timeout = absl::InfiniteDuration();
    {
      absl::MutexLock lock(&mu_);
      for (const Child& c : children_) {
        if (c.up && c.pidfd >= 0) {
          fds.push_back({c.pidfd, POLLIN, 0});
        } else if (c.up) {
          timeout = std::min(timeout, kPollTick);
        } else {
          timeout = std::min(timeout, std::max(c.restart_at - now, absl::ZeroDuration()));
        }
      }
    }
    int timeout_ms = timeout == absl::InfiniteDuration()
                         ? -1
                         : static_cast<int>(absl::ToInt64Milliseconds(
                               absl::Ceil(timeout, absl::Milliseconds(1))));
    int ready = poll(fds.data(), fds.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat("poll: ", strerror(errno)));
    }
    if (stop_requested_.load()) break;

    bool changed = ReapExited(/*stopping=*/false);
    std::vector<size_t> due;
    {
      absl::MutexLock lock(&mu_);
      now = absl::Now();
      for (size_t i = 0; i < children_.size(); ++i) {
        if (!children_[i].up && children_[i].restart_at <= now) due.push_back(i);
      }
    }
    for (size_t i : due) StartChild(i);
    if (changed || !due.empty()) NotifyChange();
  }
  StopAll();
  return absl::OkStatus();
}

void Supervisor::StopAll() {
  if (options_.on_stopping) options_.on_stopping();
  std::vector<pollfd> fds;
  {
    absl::MutexLock lock(&mu_);
    for (Child& c : children_) {
      c.restart_at = absl::InfiniteFuture();
      if (!c.up) continue;
      LOG(INFO) << "stopping " << c.spec.name << " (pid " << c.pid << ")";
      kill(c.pid, SIGTERM);
    }
  }
  ReapExited(/*stopping=*/true);
  const absl::Time deadline = absl::Now() + options_.stop_grace;
  while (true) {
    fds.clear();
    bool any_up = false;
    bool all_pollable = true;
    {
      absl::MutexLock lock(&mu_);
      for (const Child& c : children_) {
        if (!c.up) continue;
        any_up = true;
        if (c.pidfd >= 0) {
          fds.push_back({c.pidfd, POLLIN, 0});
        } else {
          all_pollable = false;
        }
      }
    }
    absl::Duration left = deadline - absl::Now();
    if (!any_up || left <= absl::ZeroDuration()) break;
    absl::Duration wait = all_pollable ? left : std::min(left, absl::Milliseconds(20));
    poll(fds.data(), fds.size(),
         static_cast<int>(absl::ToInt64Milliseconds(absl::Ceil(wait, absl::Milliseconds(1)))));
    ReapExited(/*stopping=*/true);
  }
  {
    absl::MutexLock lock(&mu_);
    for (Child& c : children_) {
      if (c.up) {
        LOG(WARNING) << c.spec.name << " (pid " << c.pid << ") did not exit within "
                     << options_.stop_grace << " of SIGTERM; sending SIGKILL";
        kill(c.pid, SIGKILL);
      }
    }
  }
  {
    absl::MutexLock lock(&mu_);
    for (Child& c : children_) {
      if (!c.up) continue;
      int status = 0;
      pid_t r;
      while ((r = waitpid(c.pid, &status, 0)) < 0 && errno == EINTR) {
      }
      c.up = false;
      c.last_exit = r < 0 ? "lost" : DescribeWaitStatus(status);
      if (c.pidfd >= 0) {
        close(c.pidfd);
        c.pidfd = -1;
      }
    }
    for (const Child& c : children_) RemoveSockets(c.spec.sockets);
  }
  NotifyChange();
}

}  // namespace lumen
