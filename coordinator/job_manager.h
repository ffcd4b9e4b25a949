// Owns the job queue: validation at submit, FIFO dispatch to the workers, state transitions with
// their history in a JobStore, and watchers. Jobs run side by side, one per worker, while what
// they hold of the node's shared memory (their ResourceClaims: the memstore's tiers, the host
// memory the workers take) fits together; the head of the queue waits for that, later jobs do
// not pass it. A job whose run is interrupted (the coordinator stops, the worker dies) goes
// back to the head of the queue and continues from its latest checkpoint. Thread-safe.
#ifndef LUMEN_COORDINATOR_JOB_MANAGER_H_
#define LUMEN_COORDINATOR_JOB_MANAGER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "coordinator/worker_client.h"
#include "memstore/memstore_client.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "proto/lumen.pb.h"

namespace lumen {

struct JobManagerOptions {
  // Jobs write their checkpoints under <data_dir>/jobs/<job id>/.
  std::string data_dir;
  NodeLimits limits;
  // A job whose worker fails (UNAVAILABLE: the process died, or the memstore it used;
  // DATA_LOSS: the memstore lost the job's tensors) this many times without a new checkpoint
  // in between fails; before that it is resumed.
  int max_worker_failures = 3;
};

class JobManager {
 public:
  // Called with each event of a watch; `done` is true on the last one. Called with the
  // manager's lock held: it must not block or call back into the manager.
  using WatchCallback = std::function<void(const WatchJobEvent& event, bool done)>;

  // `store` and `workers` must outlive the manager. `registry` receives the job metrics.
  JobManager(JobStore* store, std::vector<WorkerClient*> workers, JobManagerOptions options,
             prometheus::Registry& registry);
  ~JobManager();

  // Loads the stored jobs, queues the ones that were running when the coordinator stopped
  // (to resume from their latest checkpoints) and then the QUEUED ones in order, and starts
  // dispatching.
  absl::Status Start();
  // Cancels the running tasks, waits for their runs to end and stops dispatching. Idempotent.
  void Stop();

  // Plans a job when it starts (PlanJobOnNode on the node's figures): the schedule goes to the
  // worker with the task, its predicted step time into the job and each of its step records.
  // Optional; set before Start. A job the planner cannot plan runs in the worker's own order.
  using JobPlanner = std::function<absl::StatusOr<StepSchedule>(const JobSpec& spec)>;
  void SetJobPlanner(JobPlanner planner);

  // Where jobs that ran offloaded keep their tensors (under "<job id>/"). When a job ends the
  // manager frees what is left there (MemstoreClient::FreeTensors): a worker that crashed
  // mid-job cannot free it itself, and its pins would block the memory forever. It records
  // that in Job.tensors_freed; Start frees what jobs that ran without it left (the coordinator
  // died, or the node was stopping). Optional; set before Start; not owned.
  void SetMemstore(MemstoreClient* memstore);

  absl::StatusOr<Job> Submit(const std::string& spec_yaml, const std::string& base_dir);
  std::vector<Job> List();
  absl::StatusOr<Job> Get(const std::string& job_id);
  absl::StatusOr<Job> Cancel(const std::string& job_id);
  std::map<std::string, int64_t> JobsByState();

  // Sends the job with its step history now; with `follow`, then every change until the job
  // ends. Returns a handle for Unwatch (0 when the watch already ended).
  absl::StatusOr<int64_t> Watch(const std::string& job_id, bool follow, WatchCallback callback);
  // After Unwatch returns, the callback is not called again.
  void Unwatch(int64_t handle);

 private:
  struct Watcher {
    std::string job_id;
    WatchCallback callback;
  };

  // What running jobs share, -1 where unknown: the memstore's tier capacities and the host
  // memory workers may take (MemAvailable while no job runs).
  struct NodeShares {
    int64_t memstore_host_bytes = -1;
    int64_t memstore_nvme_bytes = -1;
    int64_t worker_host_bytes = -1;
  };
  struct Run {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  void DispatchLoop();
  // Learns the shares it does not know yet (an RPC to the memstore) and, while no job runs,
  // the host memory available. Call without the lock.
  void RefreshShares() ABSL_LOCKS_EXCLUDED(mu_);
  // Asks a worker for the claims of a job submitted while none could answer (a worker still
  // measuring its device at the node's first start): the head of the queue, else a running
  // job; at most every 5 s. Call without the lock.
  void SizeJobs() ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<WorkerClient*> IdleWorkers() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // How many workers `job` trains on (resources.workers; its claims hold on each).
  static int WorkersOf(const Job& job);
  // Whether the head of the queue can start now on an idle worker; when only the claims stop
  // it, `why` (if not null) says which share and the bytes.
  bool HeadCanStart(std::string* why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // lumen_node_claimed_bytes and lumen_node_share_capacity_bytes from running_ and shares_.
  void UpdateShareGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the job on `workers`: one task, or a replica on each (data parallel).
  void RunJob(const std::string& job_id, std::vector<WorkerClient*> workers);
  void OnTaskEvent(const std::string& job_id, const TaskEvent& event);
  void FinishJob(const std::string& job_id, JobState state, const std::string& reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts an interrupted job back at the head of the queue (QUEUED, resumes + 1, `reason`).
  void Requeue(Job& job, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Before a resumed job's run: where it continues from (its latest checkpoint, or "" for the
  // start), with the step records after that dropped.
  std::string PrepareResume(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the job's tensors left in the memstore (none when the worker freed them); logs
  // failures and returns the memstore's status. Call without the lock (it is an RPC).
  absl::Status ReclaimJobTensors(const std::string& job_id) ABSL_LOCKS_EXCLUDED(mu_);
  // Stores `job`, updates metrics and tells watchers (with `steps`, if any).
  void Publish(const Job& job, const std::vector<StepRecord>& steps)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateStateGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  JobStore* const store_;
  const std::vector<WorkerClient*> workers_;
  const JobManagerOptions options_;
  prometheus::Family<prometheus::Gauge>& jobs_gauge_;
  prometheus::Family<prometheus::Gauge>& step_gauge_;
  prometheus::Family<prometheus::Gauge>& loss_gauge_;
  prometheus::Family<prometheus::Gauge>& tokens_per_s_gauge_;
  prometheus::Family<prometheus::Gauge>& step_time_gauge_;
  prometheus::Family<prometheus::Gauge>& predicted_step_time_gauge_;
  JobPlanner planner_;  // set before Start, then read-only
  MemstoreClient* memstore_ = nullptr;  // set before Start, then read-only
  prometheus::Family<prometheus::Counter>& tokens_counter_;
  prometheus::Family<prometheus::Counter>& resumes_counter_;
  prometheus::Family<prometheus::Gauge>& claimed_gauge_;
  prometheus::Family<prometheus::Gauge>& share_capacity_gauge_;

  absl::Mutex mu_;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, bool> cancel_requested_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, Watcher> watchers_ ABSL_GUARDED_BY(mu_);
  int64_t next_watch_ ABSL_GUARDED_BY(mu_) = 1;
  // The job each busy worker runs.
  std::map<WorkerClient*, std::string> running_ ABSL_GUARDED_BY(mu_);
  // For each running job, the jobs that ran beside it during its run.
  std::map<std::string, std::set<std::string>> company_ ABSL_GUARDED_BY(mu_);
  NodeShares shares_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sizing_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread dispatcher_;
  // Each run's thread; the dispatcher's own (it joins them).
  std::vector<Run> runs_;
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_JOB_MANAGER_H_
