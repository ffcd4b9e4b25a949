// Starts a fixed set of child processes and keeps them running: a child that exits or is
// killed is restarted with exponential backoff; on a stop request every child gets SIGTERM,
// then SIGKILL after a grace period, and is reaped. Knows nothing about Lumen's processes;
// lumend/node.h builds the child list.
//
// Thread-safety: Start() and Run() must be called from one thread (the "run thread"), in that
// order. RequestStop() is async-signal-safe and may be called from any thread or a signal
// handler at any time. Snapshot() may be called from any thread.
//
// Children get PR_SET_PDEATHSIG(SIGTERM), which Linux ties to the *thread* that forked them:
// the run thread must outlive the children (lumend runs the supervisor on its main thread).
#ifndef LUMEN_LUMEND_SUPERVISOR_H_
#define LUMEN_LUMEND_SUPERVISOR_H_

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace lumen {

// One process to keep running.
struct ChildSpec {
  std::string name;               // unique, e.g. "worker-0"; used in logs and status
  std::vector<std::string> argv;  // argv[0] is the executable's path (no PATH search)
  // stdout and stderr of the child are appended to this file; empty = inherit ours.
  std::string log_file;
  // Unix sockets the child serves: deleted before each start (stale files from a crash) and
  // after the child is stopped for good.
  std::vector<std::string> sockets;
  // Informational, reported in ProcessStatus: where the child serves Prometheus metrics.
  std::string metrics_address;
};

// Restart delays: `initial` after the first crash, doubling per consecutive crash up to
// `max`; a child that stayed up for `reset_after` counts as healthy and starts again at
// `initial`. Short delays recover fast from a one-off crash; the cap keeps a child that
// crashes at once from spinning a core and flooding its log.
struct BackoffPolicy {
  absl::Duration initial = absl::Milliseconds(500);
  absl::Duration max = absl::Seconds(30);
  absl::Duration reset_after = absl::Seconds(60);
};

// The delay before restarting a child that has just exited after `uptime`, given the
// `previous` delay used for it (zero before its first restart).
absl::Duration NextBackoff(const BackoffPolicy& policy, absl::Duration previous,
                           absl::Duration uptime);

// What is known about one child right now.
struct ProcessStatus {
  std::string name;
  pid_t pid = 0;  // the running process, or the last one (0 before the first start)
  bool up = false;
  int restarts = 0;                 // starts after the first one
  absl::Time start_time = absl::InfinitePast();  // of the current or last process
  std::string last_exit;            // "exited with status 1", "killed by signal 9", or ""
  std::string metrics_address;      // from the ChildSpec
  std::string log_file;             // from the ChildSpec
  std::vector<std::string> sockets; // from the ChildSpec
};

struct SupervisorOptions {
  BackoffPolicy backoff;
  // After SIGTERM, how long children get to exit before SIGKILL. lumend must finish its own
  // shutdown within 10 s, so this leaves it 2 s.
  absl::Duration stop_grace = absl::Seconds(8);
  // Called on the run thread after every change of any child's state (start, exit), and once
  // more after the final stop. Must not call back into the Supervisor except Snapshot().
  std::function<void(const std::vector<ProcessStatus>&)> on_change;
  // Called on the run thread once a stop has been requested, before the children get
  // SIGTERM: the place to begin other slow shutdown work in parallel.
  std::function<void()> on_stopping;
};

class Supervisor {
 public:
  // Fails if names are not unique, a spec has no argv, or the wake-up pipe cannot be made.
  static absl::StatusOr<std::unique_ptr<Supervisor>> Create(std::vector<ChildSpec> children,
                                                            SupervisorOptions options);
  ~Supervisor();

  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts every child in list order. A child that cannot be started (fork fails, or exec
  // fails and it exits 127) is treated like a crash and retried by Run(); so this only fails
  // on internal errors.
  absl::Status Start();

  // Supervises until RequestStop(), then stops every child (SIGTERM, SIGKILL after
  // stop_grace), reaps them, deletes their sockets and returns. When it returns, no child
  // process is left.
  absl::Status Run();

  // Asks Run() to stop the children and return. Async-signal-safe; idempotent.
  void RequestStop();

  std::vector<ProcessStatus> Snapshot() const;

 private:
  // One supervised child. Fields are written only on the run thread, under mu_.
  struct Child {
    ChildSpec spec;
    pid_t pid = 0;
    int pidfd = -1;  // readable when the process exits; -1 if pidfd_open is unavailable
    bool up = false;
    int starts = 0;
    absl::Time start_time = absl::InfinitePast();
    absl::Time restart_at = absl::InfiniteFuture();  // when down: the next start
    absl::Duration backoff = absl::ZeroDuration();   // the delay used for the last restart
    std::string last_exit;
  };

  Supervisor(std::vector<ChildSpec> children, SupervisorOptions options, int wake_read,
             int wake_write);

  // Run thread only.
  void StartChild(size_t index);
  // Reaps children that have exited; schedules restarts unless `stopping`. Returns whether
  // any child exited.
  bool ReapExited(bool stopping);
  void StopAll();
  void NotifyChange();

  // Constant after construction.
  const SupervisorOptions options_;
  const int wake_read_;
  const int wake_write_;

  std::atomic<bool> stop_requested_{false};

  mutable absl::Mutex mu_;
  std::vector<Child> children_ ABSL_GUARDED_BY(mu_);  // fixed size after construction
};

}  // namespace lumen

#endif  // LUMEN_LUMEND_SUPERVISOR_H_
