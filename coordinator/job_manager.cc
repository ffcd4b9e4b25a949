#include "coordinator/job_manager.h"

#include <algorithm>
#include <filesystem>
#include <optional>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/host_memory.h"
#include "common/job_tensors.h"
#include "common/status_macros.h"
#include "common/units.h"
#include "glog/logging.h"

namespace lumen {
namespace {

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

bool IsTerminal(JobState state) {
  return state == SUCCEEDED || state == FAILED || state == CANCELLED;
}

void AddClaims(const ResourceClaims& c, ResourceClaims* sum) {
  sum->set_memstore_host_bytes(sum->memstore_host_bytes() + c.memstore_host_bytes());
  sum->set_memstore_nvme_bytes(sum->memstore_nvme_bytes() + c.memstore_nvme_bytes());
  sum->set_worker_host_bytes(sum->worker_host_bytes() + c.worker_host_bytes());
}

}  // namespace

JobManager::JobManager(JobStore* store, std::vector<WorkerClient*> workers,
                       JobManagerOptions options, prometheus::Registry& registry)
    : store_(store),
      workers_(std::move(workers)),
      options_(std::move(options)),
      jobs_gauge_(prometheus::BuildGauge()
                      .Name("lumen_jobs")
                      .Help("Jobs known to the coordinator, by state")
                      .Register(registry)),
      step_gauge_(prometheus::BuildGauge()
                      .Name("lumen_job_step")
                      .Help("Last completed optimizer step of a job")
                      .Register(registry)),
      loss_gauge_(prometheus::BuildGauge()
                      .Name("lumen_job_loss")
                      .Help("Training loss of a job's last step")
                      .Register(registry)),
      tokens_per_s_gauge_(prometheus::BuildGauge()
                              .Name("lumen_job_tokens_per_second")
                              .Help("Training throughput of a job's last step")
                              .Register(registry)),
      step_time_gauge_(prometheus::BuildGauge()
                           .Name("lumen_job_step_time_seconds")
                           .Help("Wall time of a job's last step")
                           .Register(registry)),
      predicted_step_time_gauge_(prometheus::BuildGauge()
                                     .Name("lumen_job_predicted_step_time_seconds")
                                     .Help("The planner's step time for the job on this node")
                                     .Register(registry)),
      tokens_counter_(prometheus::BuildCounter()
                          .Name("lumen_job_tokens_total")
                          .Help("Tokens trained, by job")
                          .Register(registry)),
      resumes_counter_(prometheus::BuildCounter()
                           .Name("lumen_job_resumes_total")
                           .Help("Times a job's run was interrupted and the job queued again to "
                                 "resume from its latest checkpoint, by job")
                           .Register(registry)),
      claimed_gauge_(prometheus::BuildGauge()
                         .Name("lumen_node_claimed_bytes")
                         .Help("What the running jobs hold of the node's shared memory, by share "
                               "(memstore_host, memstore_nvme, worker_host)")
                         .Register(registry)),
      share_capacity_gauge_(prometheus::BuildGauge()
                                .Name("lumen_node_share_capacity_bytes")
                                .Help("What jobs running side by side may hold of each share of "
                                      "the node's memory (-1: not known yet)")
                                .Register(registry)) {
  absl::MutexLock lock(&mu_);
  UpdateShareGauges();
}

JobManager::~JobManager() { Stop(); }

absl::Status JobManager::Start() {
  ASSIGN_OR_RETURN(std::vector<Job> stored, store_->ListJobs());
  // Jobs that ran and may have left tensors in the memstore: one that was running when the
  // coordinator stopped, or ended while the memstore could not be asked.
  std::vector<std::string> reclaim;
  absl::MutexLock lock(&mu_);
  // The store is the truth: jobs submitted before Start are in it too.
  jobs_.clear();
  queue_.clear();
  // Jobs that were running (or were put back because the node stopped) go first, in id order.
  std::vector<std::string> resumed;
  for (Job& job : stored) {
    if (job.start_time_unix_ms() != 0 && !job.tensors_freed()) reclaim.push_back(job.id());
    const std::string id = job.id();
    jobs_[id] = std::move(job);
    Job& j = jobs_[id];
    if (j.state() == RUNNING) {
      Requeue(j, absl::StrCat("the coordinator stopped while the job was running on ",
                              j.worker()));
    }
    if (j.state() != QUEUED) continue;
    if (j.start_time_unix_ms() != 0) {
      resumed.push_back(id);
    } else {
      queue_.push_back(id);
    }
  }
  queue_.insert(queue_.begin(), resumed.begin(), resumed.end());
  UpdateStateGauges();
  LOG(INFO) << "loaded " << jobs_.size() << " jobs, " << queue_.size() << " queued";
  // On the dispatcher's thread, before any job runs: the memstore may still be starting
  // (lumend starts every process at once), so an unreachable one is retried for a minute.
  dispatcher_ = std::thread([this, reclaim] {
    for (const std::string& id : reclaim) {
      // A worker whose task lost this coordinator stops it between steps and memstore calls;
      // until then it may still write the job's tensors.
      for (WorkerClient* worker : workers_) worker->AwaitTaskStopped(id, absl::Seconds(30));
      for (int attempt = 0;; ++attempt) {
        {
          absl::MutexLock lock(&mu_);
          if (stopping_) return;
        }
        const absl::Status s = ReclaimJobTensors(id);
        if (s.ok()) {
          absl::MutexLock lock(&mu_);
          Job& job = jobs_[id];
          job.set_tensors_freed(true);
          if (absl::Status put = store_->PutJob(job); !put.ok()) {
            LOG(ERROR) << id << ": cannot store the job: " << put;
          }
        }
        if (!absl::IsUnavailable(s) || attempt == 60) break;
        absl::SleepFor(absl::Seconds(1));
      }
    }
    DispatchLoop();
  });
  return absl::OkStatus();
}

void JobManager::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    for (const auto& [worker, job_id] : running_) worker->CancelTask(job_id);
  }
  if (dispatcher_.joinable()) dispatcher_.join();
}

absl::StatusOr<Job> JobManager::Submit(const std::string& spec_yaml, const std::string& base_dir) {
  ASSIGN_OR_RETURN(JobSpec spec, ResolveJobSpec(spec_yaml, base_dir, options_.limits));
  // Admission: a job that cannot fit the idle node is refused now, with the numbers, rather
  // than failing when it reaches a worker; one that fits learns what it will hold of the
  // node's shared memory, to run beside others while that fits. Workers are alike; ask the
  // first. One that cannot answer (still starting) does not block the submit: the task would
  // fail with the same message later, and the job runs alone.
  std::optional<ResourceClaims> claims;
  if (!workers_.empty()) {
    int64_t host_available = 0;
    {
      absl::MutexLock lock(&mu_);
      host_available = std::max<int64_t>(0, shares_.worker_host_bytes);
    }
    absl::StatusOr<ResourceClaims> fits =
        workers_.front()->CheckTask(spec, host_available, absl::Seconds(5));
    const absl::Status& s = fits.status();
    if (absl::IsResourceExhausted(s) || absl::IsInvalidArgument(s)) {
      return absl::Status(s.code(), absl::StrCat("the job does not fit this node: ",
                                                 s.message()));
    }
    if (fits.ok()) {
      claims = *std::move(fits);
    } else {
      LOG(WARNING) << "admission check skipped: " << workers_.front()->name() << ": " << s;
    }
  }
  // The number, the submit time and the queue position under one lock: concurrent submits
  // queue in id order (jobs run first submitted, first served, by id).
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the coordinator is shutting down");
  ASSIGN_OR_RETURN(int64_t number, store_->NextJobNumber());
  Job job;
  job.set_id(absl::StrFormat("job-%06d", number));
  *job.mutable_spec() = std::move(spec);
  job.set_spec_yaml(spec_yaml);
  job.set_state(QUEUED);
  job.set_submit_time_unix_ms(NowMs());
  job.set_parameter_count(ParameterCount(job.spec().model()));
  if (claims) *job.mutable_claims() = *claims;
  job.set_output_dir(
      (std::filesystem::path(options_.data_dir) / "jobs" / job.id()).string());
  RETURN_IF_ERROR(store_->PutJob(job));
  jobs_[job.id()] = job;
  queue_.push_back(job.id());
  UpdateStateGauges();
  LOG(INFO) << job.id() << " (" << job.spec().name() << ", " << job.parameter_count()
            << " parameters) queued at position " << queue_.size();
  return job;
}

std::vector<Job> JobManager::List() {
  absl::MutexLock lock(&mu_);
  std::vector<Job> jobs;
  for (const auto& [id, job] : jobs_) jobs.push_back(job);
  return jobs;
}

absl::StatusOr<Job> JobManager::Get(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  return it->second;
}

absl::StatusOr<Job> JobManager::Cancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  Job& job = it->second;
  if (job.state() == QUEUED) {
    queue_.erase(std::remove(queue_.begin(), queue_.end(), job_id), queue_.end());
    FinishJob(job_id, CANCELLED, "cancelled while queued");
  } else if (job.state() == RUNNING) {
    cancel_requested_[job_id] = true;
    for (const auto& [worker, id] : running_) {
      if (id == job_id) worker->CancelTask(job_id);
    }
  }
  return jobs_[job_id];
}

std::map<std::string, int64_t> JobManager::JobsByState() {
  absl::MutexLock lock(&mu_);
  std::map<std::string, int64_t> counts;
  for (JobState s : {QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED}) counts[JobState_Name(s)] = 0;
  for (const auto& [id, job] : jobs_) ++counts[JobState_Name(job.state())];
  return counts;
}

absl::StatusOr<int64_t> JobManager::Watch(const std::string& job_id, bool follow,
                                          WatchCallback callback) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  ASSIGN_OR_RETURN(std::vector<StepRecord> steps, store_->Steps(job_id));
  WatchJobEvent event;
  *event.mutable_job() = it->second;
  for (StepRecord& step : steps) *event.add_steps() = std::move(step);
  const bool done = !follow || IsTerminal(it->second.state());
  callback(event, done);
  if (done) return 0;
  const int64_t handle = next_watch_++;
  watchers_[handle] = Watcher{job_id, std::move(callback)};
  return handle;
}

void JobManager::Unwatch(int64_t handle) {
  absl::MutexLock lock(&mu_);
  watchers_.erase(handle);
}

void JobManager::DispatchLoop() {
  while (true) {
    // Runs that ended: their threads are done.
    for (auto it = runs_.begin(); it != runs_.end();) {
      if (!it->done->load()) {
        ++it;
        continue;
      }
      it->thread.join();
      it = runs_.erase(it);
    }
    RefreshShares();
    SizeJobs();
    std::string job_id;
    std::vector<WorkerClient*> workers;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || HeadCanStart(nullptr);
      };
      // Submits and ended runs wake it; the timeout refreshes the shares and reaps threads.
      const bool woken = mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Seconds(2));
      if (stopping_) break;
      if (!woken) {
        // A head job that waits while a worker is free says why (lumenctl jobs, status).
        std::string why;
        HeadCanStart(&why);
        if (!queue_.empty()) {
          Job& head = jobs_[queue_.front()];
          if (head.wait_reason() != why) {
            head.set_wait_reason(why);
            if (!why.empty()) LOG(INFO) << head.id() << " waits: " << why;
            Publish(head, {});
          }
        }
        continue;
      }
      job_id = queue_.front();
      queue_.pop_front();
      workers = IdleWorkers();
      workers.resize(WorkersOf(jobs_[job_id]));
      for (const auto& [other_worker, other] : running_) {
        company_[other].insert(job_id);
        company_[job_id].insert(other);
      }
      for (WorkerClient* w : workers) {
        // A cancel left from an earlier run of the job (a replica cancelled after its task
        // ended) must not stop this one; a Cancel of this run takes the lock, so comes after.
        w->ForgetCancel(job_id);
        running_[w] = job_id;
      }
      jobs_[job_id].clear_wait_reason();
      UpdateShareGauges();
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    runs_.push_back(Run{std::thread([this, job_id, workers, done] {
                          RunJob(job_id, workers);
                          done->store(true);
                        }),
                        done});
  }
  // Stop cancelled the running tasks; each run stores its job for the next start.
  for (Run& run : runs_) run.thread.join();
  runs_.clear();
}

void JobManager::RefreshShares() {
  bool idle;
  bool memstore_known;
  {
    absl::MutexLock lock(&mu_);
    idle = running_.empty();
    memstore_known = shares_.memstore_host_bytes >= 0;
  }
  std::optional<TierCapacity> capacity;
  if (!memstore_known && memstore_ != nullptr) {
    // The tiers' capacities are fixed while the node runs (lumend's flags).
    absl::StatusOr<GetMemstoreStatsReply> stats = memstore_->GetStats(absl::Seconds(1));
    if (stats.ok()) capacity = TierCapacityOf(*stats);
  }
  // The host memory jobs may take: what is available while none runs (the memstore's arena
  // is allocated when it starts).
  const int64_t available = idle ? AvailableHostBytes() : -1;
  absl::MutexLock lock(&mu_);
  if (capacity) {
    shares_.memstore_host_bytes = capacity->host_bytes;
    shares_.memstore_nvme_bytes = capacity->nvme_bytes;
  }
  if (available >= 0 && running_.empty()) shares_.worker_host_bytes = available;
  UpdateShareGauges();
}

void JobManager::UpdateShareGauges() {
  ResourceClaims held;
  for (const auto& [worker, id] : running_) AddClaims(jobs_[id].claims(), &held);
  for (const auto& [share, claimed, capacity] :
       {std::tuple<const char*, int64_t, int64_t>{"memstore_host", held.memstore_host_bytes(),
                                                  shares_.memstore_host_bytes},
        {"memstore_nvme", held.memstore_nvme_bytes(), shares_.memstore_nvme_bytes},
        {"worker_host", held.worker_host_bytes(), shares_.worker_host_bytes}}) {
    claimed_gauge_.Add({{"share", share}}).Set(static_cast<double>(claimed));
    share_capacity_gauge_.Add({{"share", share}}).Set(static_cast<double>(capacity));
  }
}

void JobManager::SizeJobs() {
  std::string id;
  JobSpec spec;
  int64_t host_available = 0;
  {
    absl::MutexLock lock(&mu_);
    if (workers_.empty()) return;
    // The head of the queue, else a running job (it started alone, unsized).
    std::vector<std::string> candidates;
    if (!queue_.empty()) candidates.push_back(queue_.front());
    for (const auto& [worker, running] : running_) candidates.push_back(running);
    for (const std::string& c : candidates) {
      if (!jobs_[c].has_claims()) {
        id = c;
        break;
      }
    }
    if (id.empty()) return;
    const absl::Time now = absl::Now();
    if (now - last_sizing_ < absl::Seconds(5)) return;
    last_sizing_ = now;
    spec = jobs_[id].spec();
    host_available = std::max<int64_t>(0, shares_.worker_host_bytes);
  }
  absl::StatusOr<ResourceClaims> claims =
      workers_.front()->CheckTask(spec, host_available, absl::Seconds(2));
  if (!claims.ok()) return;  // it runs alone; a check that refuses it now fails its run
  absl::MutexLock lock(&mu_);
  Job& job = jobs_[id];
  if (IsTerminal(job.state()) || job.has_claims()) return;
  *job.mutable_claims() = *std::move(claims);
  UpdateShareGauges();
  LOG(INFO) << id << ": sized now (its worker could not be asked at submit)";
  Publish(job, {});
}

std::vector<WorkerClient*> JobManager::IdleWorkers() {
  std::vector<WorkerClient*> idle;
  for (WorkerClient* worker : workers_) {
    if (running_.count(worker) == 0) idle.push_back(worker);
  }
  return idle;
}

int JobManager::WorkersOf(const Job& job) {
  return static_cast<int>(std::max<int64_t>(1, job.spec().resources().workers()));
}

bool JobManager::HeadCanStart(std::string* why) {
  if (why != nullptr) why->clear();
  const size_t idle = IdleWorkers().size();
  if (queue_.empty() || idle == 0) return false;
  auto wait = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
  const Job& head = jobs_.at(queue_.front());
  const int n = WorkersOf(head);
  if (idle < static_cast<size_t>(n)) {
    return wait(absl::StrCat("it trains on ", n, " workers; ", idle,
                             idle == 1 ? " is" : " are", " free"));
  }
  if (running_.empty()) return true;
  if (!head.has_claims()) {
    return wait("it runs alone: its use of the node's memory is unknown (the worker could not "
                "be asked when it was submitted)");
  }
  if (head.runs_alone()) {
    return wait("it runs alone: it ran out of memory beside other jobs before");
  }
  // Claims are per worker: a job on several workers holds them on each.
  ResourceClaims beside, needs;
  for (int i = 0; i < n; ++i) AddClaims(head.claims(), &needs);
  std::vector<std::string> ids;
  for (const auto& [worker, id] : running_) {
    const Job& job = jobs_.at(id);
    if (!job.has_claims() || job.runs_alone()) return wait(absl::StrCat(id, " runs alone"));
    AddClaims(job.claims(), &beside);
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  }
  struct Share {
    const char* name;
    int64_t needs, held, capacity;
  };
  for (const Share& share :
       {Share{"the memstore's host tier", needs.memstore_host_bytes(),
              beside.memstore_host_bytes(), shares_.memstore_host_bytes},
        Share{"the memstore's NVMe tier", needs.memstore_nvme_bytes(),
              beside.memstore_nvme_bytes(), shares_.memstore_nvme_bytes},
        Share{"host memory for workers", needs.worker_host_bytes(),
              beside.worker_host_bytes(), shares_.worker_host_bytes}}) {
    if (share.needs == 0 || share.needs + share.held <= share.capacity) continue;
    return wait(absl::StrCat(
        share.name, ": needs ", FormatBytes(share.needs), "; ", absl::StrJoin(ids, ", "),
        " hold ", FormatBytes(share.held), " of ",
        share.capacity < 0 ? std::string("an unknown capacity")
                           : FormatBytes(share.capacity)));
  }
  return true;
}

void JobManager::SetJobPlanner(JobPlanner planner) { planner_ = std::move(planner); }

void JobManager::SetMemstore(MemstoreClient* memstore) { memstore_ = memstore; }

absl::Status JobManager::ReclaimJobTensors(const std::string& job_id) {
  if (memstore_ == nullptr) return absl::OkStatus();
  // The trainer's tensors, then what replicas of a job on several workers exchanged (the last
  // steps' are left for this).
  for (const std::string& prefix : {JobTensorPrefix(job_id), JobReplicaPrefix(job_id)}) {
    absl::StatusOr<FreeTensorsReply> freed = memstore_->FreeTensors(prefix, absl::Seconds(30));
    if (!freed.ok()) {
      LOG(WARNING) << job_id << ": cannot free the job's tensors in the memstore: "
                   << freed.status();
      return freed.status();
    }
    if (prefix == JobTensorPrefix(job_id) &&
        freed->tensors() + freed->pins() + freed->writes() > 0) {
      LOG(WARNING) << job_id << ": freed what the job left in the memstore: " << freed->tensors()
                   << " tensors (" << freed->bytes() << " bytes), " << freed->pins()
                   << " pins, " << freed->writes() << " unfinished writes";
    }
  }
  return absl::OkStatus();
}

void JobManager::RunJob(const std::string& job_id, std::vector<WorkerClient*> workers) {
  double predicted = 0;
  RunTaskRequest request;
  // The planner plans a job on one worker, or on several as data-parallel replicas: those get
  // the predicted step time but no schedule (the schedule a worker runs is one worker's).
  if (planner_) {
    JobSpec spec;
    {
      absl::MutexLock lock(&mu_);
      spec = jobs_[job_id].spec();
    }
    absl::StatusOr<StepSchedule> schedule = planner_(spec);
    if (schedule.ok()) {
      predicted = schedule->predicted_step_time_s();
      if (workers.size() == 1) *request.mutable_schedule() = *std::move(schedule);
    } else {
      LOG(WARNING) << job_id << ": no plan; the worker runs its own order and no step time is "
                   << "predicted: " << schedule.status();
    }
  }
  {
    absl::MutexLock lock(&mu_);
    Job& job = jobs_[job_id];
    if (job.resumes() > 0) request.set_resume_from(PrepareResume(job));
    request.set_run(job.resumes());
    job.set_state(RUNNING);
    if (job.start_time_unix_ms() == 0) job.set_start_time_unix_ms(NowMs());  // the first run's
    job.set_tensors_freed(false);  // this run's tensors, until it ends
    std::vector<std::string> names;
    for (WorkerClient* w : workers) names.push_back(w->name());
    job.set_worker(absl::StrJoin(names, ","));
    job.set_predicted_step_time_s(predicted);
    resumes_counter_.Add({{"job", job_id}});  // 0 until the job is interrupted
    if (predicted > 0) {
      predicted_step_time_gauge_.Add({{"job", job_id}}).Set(predicted);
      LOG(INFO) << job_id << ": predicted step time " << predicted << " s";
    }
    Publish(job, {});
    request.set_job_id(job_id);
    *request.mutable_spec() = job.spec();
    request.set_output_dir(job.output_dir());
    LOG(INFO) << job_id << " running on " << job.worker()
              << (job.resumes() == 0 ? ""
                  : request.resume_from().empty()
                      ? " (resumed from the start: it has no checkpoint)"
                      : absl::StrCat(" (resumed from ", request.resume_from(), ")"));
  }
  // One task per worker: the whole job, or one replica each of a job on several workers
  // (replica 0 reports the steps and checkpoints). A replica that fails stops the others.
  const int n = static_cast<int>(workers.size());
  std::vector<absl::Status> statuses(n);
  auto run = [&](int r) {
    RunTaskRequest task = request;
    if (n > 1) {
      task.set_rank(r);
      task.set_world_size(n);
    }
    statuses[r] = workers[r]->RunTask(task, [this, &job_id, r](const TaskEvent& event) {
      if (r == 0) OnTaskEvent(job_id, event);
    });
    if (!statuses[r].ok() && !absl::IsCancelled(statuses[r])) {
      for (int q = 0; q < n; ++q) {
        if (q != r) workers[q]->CancelTask(job_id);
      }
    }
  };
  std::vector<std::thread> replicas;
  for (int r = 1; r < n; ++r) replicas.emplace_back(run, r);
  run(0);
  for (std::thread& t : replicas) t.join();
  // The cause: the first failure that is not the cancel it made of the others.
  int failed = 0;
  for (int r = 0; r < n; ++r) {
    if (!statuses[r].ok() && (statuses[failed].ok() || absl::IsCancelled(statuses[failed]))) {
      failed = r;
    }
  }
  const absl::Status status = statuses[failed];
  WorkerClient* const failed_worker = workers[failed];
  // A worker that ended the task freed the job's tensors; one that crashed could not. When the
  // node is stopping the memstore may be too (and not answer): the next start frees them.
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
  }
  const bool freed = !stopping && ReclaimJobTensors(job_id).ok();
  absl::MutexLock lock(&mu_);
  Job& job = jobs_[job_id];
  job.set_tensors_freed(freed);
  for (WorkerClient* w : workers) running_.erase(w);
  const std::set<std::string> company = std::move(company_[job_id]);
  company_.erase(job_id);
  UpdateShareGauges();
  const std::string reason = std::string(status.message()).find(failed_worker->name()) == 0
                                 ? std::string(status.message())
                                 : absl::StrCat(failed_worker->name(), ": ", status.ToString());
  if (cancel_requested_[job_id]) {
    FinishJob(job_id, CANCELLED, "cancelled while running");
  } else if (stopping_) {
    // The node is stopping: the next start resumes the job from its latest checkpoint.
    Requeue(job, absl::StrCat("the coordinator stopped while the job was running on ",
                              job.worker()));
  } else if (status.ok()) {
    FinishJob(job_id, SUCCEEDED, "");
  } else if (absl::IsResourceExhausted(status) && !company.empty() &&
             job.worker_failures() + 1 < options_.max_worker_failures) {
    // Out of memory with other jobs beside it: their claims together were too low. It runs
    // alone from now on, from its latest checkpoint.
    job.set_worker_failures(job.worker_failures() + 1);
    job.set_runs_alone(true);
    Requeue(job, absl::StrCat(reason, " (out of memory beside ", absl::StrJoin(company, ", "),
                              "; it runs alone from now on)"));
    queue_.push_front(job_id);
  } else if (absl::IsUnavailable(status) || absl::IsDataLoss(status) ||
             absl::IsAborted(status)) {
    // The worker or the memstore died under the job (UNAVAILABLE), or the memstore lost the
    // job's tensors when it restarted (DATA_LOSS); lumend restarts the process. Or a worker
    // was still busy ending an earlier task for longer than the client waits (ABORTED).
    // Whatever was lost, the job's checkpoint has it.
    job.set_worker_failures(job.worker_failures() + 1);
    if (job.worker_failures() >= options_.max_worker_failures) {
      FinishJob(job_id, FAILED,
                absl::StrCat(reason, " (", job.worker_failures(),
                             " worker failures since the job's last checkpoint: not resumed "
                             "again)"));
    } else {
      Requeue(job, reason);
      queue_.push_front(job_id);
    }
  } else {
    FinishJob(job_id, FAILED, reason);
  }
}

void JobManager::Requeue(Job& job, const std::string& reason) {
  job.set_state(QUEUED);
  job.set_resumes(job.resumes() + 1);
  job.set_resume_reason(reason);
  resumes_counter_.Add({{"job", job.id()}}).Increment();
  LOG(WARNING) << job.id() << ": " << reason << "; queued again to resume from "
               << (job.final_checkpoint().empty() ? std::string("the start (no checkpoint yet)")
                                                  : job.final_checkpoint());
  Publish(job, {});
}

std::string JobManager::PrepareResume(Job& job) {
  // Checkpoints are <output_dir>/step-N, renamed into place once complete.
  std::string from = job.final_checkpoint();
  int64_t step = 0;
  const std::string name = std::filesystem::path(from).filename().string();
  std::error_code ec;
  if (from.empty() || !absl::StartsWith(name, "step-") ||
      !absl::SimpleAtoi(name.substr(5), &step) ||
      !std::filesystem::is_directory(from, ec)) {
    if (!from.empty()) {
      LOG(WARNING) << job.id() << ": checkpoint " << from << " is gone; resuming from the start";
    }
    from.clear();
    step = 0;
  }
  job.set_resumed_from(from);
  // The records of the steps trained again are replaced; drop those past the checkpoint now,
  // so the history never shows steps of both runs.
  StepRecord latest;
  if (absl::StatusOr<std::vector<StepRecord>> steps = store_->Steps(job.id()); steps.ok()) {
    for (const StepRecord& s : *steps) {
      if (s.step() <= step) latest = s;
    }
  }
  *job.mutable_latest_step() = latest;
  if (absl::Status s = store_->DropStepsAfter(job, step); !s.ok()) {
    LOG(ERROR) << job.id() << ": cannot drop the step records after step " << step << ": " << s;
  }
  return from;
}

void JobManager::OnTaskEvent(const std::string& job_id, const TaskEvent& event) {
  absl::MutexLock lock(&mu_);
  Job& job = jobs_[job_id];
  if (event.has_step()) {
    StepRecord step = event.step();
    step.set_predicted_step_time_s(job.predicted_step_time_s());
    *job.mutable_latest_step() = step;
    const prometheus::Labels labels{{"job", job_id}};
    step_gauge_.Add(labels).Set(event.step().step());
    loss_gauge_.Add(labels).Set(event.step().loss());
    tokens_per_s_gauge_.Add(labels).Set(event.step().tokens_per_s());
    step_time_gauge_.Add(labels).Set(event.step().step_time_s());
    tokens_counter_.Add(labels).Increment(event.step().tokens());
    if (absl::Status s = store_->PutStep(job, step); !s.ok()) {
      LOG(ERROR) << job_id << ": cannot store step " << step.step() << ": " << s;
    }
    Publish(job, {step});
  } else if (!event.checkpoint().empty()) {
    job.set_final_checkpoint(event.checkpoint());
    job.set_worker_failures(0);  // progress: failures before it do not count against the job
    Publish(job, {});
  }
}

void JobManager::FinishJob(const std::string& job_id, JobState state, const std::string& reason) {
  Job& job = jobs_[job_id];
  job.set_state(state);
  job.set_end_time_unix_ms(NowMs());
  job.set_failure_reason(reason);
  cancel_requested_.erase(job_id);
  LOG(INFO) << job_id << " " << JobState_Name(state) << (reason.empty() ? "" : ": ") << reason;
  Publish(job, {});
}

void JobManager::Publish(const Job& job, const std::vector<StepRecord>& steps) {
  if (steps.empty()) {
    if (absl::Status s = store_->PutJob(job); !s.ok()) {
      LOG(ERROR) << job.id() << ": cannot store the job: " << s;
    }
  }
  UpdateStateGauges();
  WatchJobEvent event;
  *event.mutable_job() = job;
  for (const StepRecord& step : steps) *event.add_steps() = step;
  const bool done = IsTerminal(job.state());
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    if (it->second.job_id != job.id()) {
      ++it;
      continue;
    }
    it->second.callback(event, done);
    it = done ? watchers_.erase(it) : std::next(it);
  }
}

void JobManager::UpdateStateGauges() {
  std::map<JobState, int64_t> counts;
  for (const auto& [id, job] : jobs_) ++counts[job.state()];
  for (JobState s : {QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED}) {
    jobs_gauge_.Add({{"state", JobState_Name(s)}}).Set(counts[s]);
  }
}

}  // namespace lumen
