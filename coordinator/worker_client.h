// The coordinator's view of one worker process. Implementations are thread-safe; at most one
// RunTask call is in flight per client.
#ifndef LUMEN_COORDINATOR_WORKER_CLIENT_H_
#define LUMEN_COORDINATOR_WORKER_CLIENT_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/lumen.pb.h"

namespace grpc {
class Channel;
class ClientContext;
}  // namespace grpc

namespace lumen {

class WorkerClient {
 public:
  virtual ~WorkerClient() = default;
  // "worker-0".
  virtual const std::string& name() const = 0;
  // Runs the task to its end, calling `on_event` (on the calling thread) for every event.
  // Returns OK when the job finished, CANCELLED after CancelTask, else the failure. After
  // CancelTask it returns once the worker has stopped the task (or stopped answering), so a
  // next run of the job never meets a replica of this one still writing to the memstore.
  virtual absl::Status RunTask(const RunTaskRequest& request,
                               const std::function<void(const TaskEvent&)>& on_event) = 0;
  // Stops the RunTask of `job_id`, whether it is in flight or about to start. Safe from any
  // thread.
  virtual void CancelTask(const std::string& job_id) = 0;
  // Forgets a CancelTask of `job_id` made for an earlier run (one that came after that run's
  // task had ended), before the job runs here again. Safe from any thread.
  virtual void ForgetCancel(const std::string& job_id) {}
  virtual absl::StatusOr<WorkerInfo> GetInfo(absl::Duration timeout) = 0;
  // Waits until the worker no longer runs a task of `job_id` (GetInfo's running_job: a
  // cancelled task runs on until it notices, and may write the job's tensors until then) or
  // does not answer, for at most `timeout`. Before a job's tensors are freed for a next run.
  void AwaitTaskStopped(const std::string& job_id, absl::Duration timeout);
  // The worker's verdict on whether `spec` fits it on an idle node with `host_available_bytes`
  // of host memory for jobs (0: the host's available memory now), and what the job would hold
  // while it runs (Worker.CheckTask).
  virtual absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec,
                                                   int64_t host_available_bytes,
                                                   absl::Duration timeout) = 0;
};

// A worker reached over gRPC at a Unix socket.
class GrpcWorkerClient : public WorkerClient {
 public:
  // `connect_timeout` bounds how long RunTask waits for a (re)starting worker to accept calls.
  GrpcWorkerClient(std::string name, const std::string& socket, absl::Duration connect_timeout);
  ~GrpcWorkerClient() override;

  const std::string& name() const override { return name_; }
  absl::Status RunTask(const RunTaskRequest& request,
                       const std::function<void(const TaskEvent&)>& on_event) override;
  void CancelTask(const std::string& job_id) override;
  void ForgetCancel(const std::string& job_id) override;
  absl::StatusOr<WorkerInfo> GetInfo(absl::Duration timeout) override;
  absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec, int64_t host_available_bytes,
                                           absl::Duration timeout) override;

 private:
  // Constant after construction.
  const std::string name_;
  const std::string socket_;
  const absl::Duration connect_timeout_;
  std::shared_ptr<grpc::Channel> channel_;

  absl::Mutex mu_;
  grpc::ClientContext* running_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::string running_job_ ABSL_GUARDED_BY(mu_);
  std::string cancelled_job_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_WORKER_CLIENT_H_
