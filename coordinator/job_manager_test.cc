#include "coordinator/job_manager.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Emits one step event per train step (from the step after the checkpoint it resumes from)
// and a checkpoint event (with its directory) every `checkpoint_every` steps; can be told to
// fail, to die after a step, or to block until cancelled.
class FakeWorker : public WorkerClient {
 public:
  const std::string& name() const override { return name_; }
  absl::Status RunTask(const RunTaskRequest& request,
                       const std::function<void(const TaskEvent&)>& on_event) override {
    {
      absl::MutexLock lock(&mu_);
      order_.push_back(request.job_id());
      schedules_.push_back(request.schedule());
      resumed_from_.push_back(request.resume_from());
    }
    int64_t first = 1;
    if (!request.resume_from().empty()) {
      first = 1 + std::stoll(std::filesystem::path(request.resume_from())
                                 .filename().string().substr(5));  // "step-N"
    }
    for (int64_t s = first; s <= request.spec().train().steps(); ++s) {
      TaskEvent event;
      event.mutable_step()->set_step(s);
      event.mutable_step()->set_loss(5.0 / s + 0.001 * order().size());  // which run
      event.mutable_step()->set_tokens(100);
      on_event(event);
      if (checkpoint_every_ > 0 && s % checkpoint_every_ == 0) {
        const std::string dir = request.output_dir() + "/step-" + std::to_string(s);
        std::filesystem::create_directories(dir);
        TaskEvent ckpt;
        ckpt.set_checkpoint(dir);
        on_event(ckpt);
      }
      if (die_after_step_ == s) {
        die_after_step_ = -1;  // once
        return absl::UnavailableError("worker-0: Socket closed");
      }
    }
    if (block_) {
      absl::MutexLock lock(&mu_);
      started_.Notify();
      auto cancelled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return cancelled_; };
      mu_.Await(absl::Condition(&cancelled));
      return absl::CancelledError("cancelled");
    }
    if (fail_) {
      // It crashed with some of the job's state in the memstore.
      if (memstore_ != nullptr) {
        (void)memstore_->Write(request.job_id() + "/layers.0.params", "abcd", 4, "float32",
                               TIER_HOST);
      }
      return absl::UnavailableError("worker-0: Socket closed");
    }
    return absl::OkStatus();
  }
  void CancelTask(const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }
  absl::StatusOr<WorkerInfo> GetInfo(absl::Duration) override {
    WorkerInfo info;
    absl::MutexLock lock(&mu_);
    if (lingering_polls_ > 0) {
      --lingering_polls_;
      info.set_running_job(lingering_job_);
    }
    return info;
  }
  // Reports a task of `job` as running for the next `polls` GetInfo calls.
  void Linger(const std::string& job, int polls) {
    absl::MutexLock lock(&mu_);
    lingering_job_ = job;
    lingering_polls_ = polls;
  }
  int lingering_polls() {
    absl::MutexLock lock(&mu_);
    return lingering_polls_;
  }
  absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec, int64_t,
                                           absl::Duration) override {
    if (spec.train().micro_batch_size() > max_micro_batch_) {
      return absl::ResourceExhaustedError("the backward of layer 1 needs 9 MiB");
    }
    return ResourceClaims();
  }
  int64_t max_micro_batch_ = 1 << 20;

  std::vector<std::string> order() {
    absl::MutexLock lock(&mu_);
    return order_;
  }
  std::vector<StepSchedule> schedules() {
    absl::MutexLock lock(&mu_);
    return schedules_;
  }
  std::vector<std::string> resumed_from() {
    absl::MutexLock lock(&mu_);
    return resumed_from_;
  }

  int64_t checkpoint_every_ = 0;
  int64_t die_after_step_ = -1;
  bool fail_ = false;
  bool block_ = false;
  MemstoreClient* memstore_ = nullptr;
  absl::Notification started_;

 private:
  const std::string name_ = "worker-0";
  std::string lingering_job_ ABSL_GUARDED_BY(mu_);
  int lingering_polls_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::string> order_ ABSL_GUARDED_BY(mu_);
  std::vector<StepSchedule> schedules_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> resumed_from_ ABSL_GUARDED_BY(mu_);
};

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp";
    std::vector<uint16_t> tokens(1000, 7);
    std::ofstream(dir_ + "/t.bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  }
  std::string Spec(int steps) {
    return "model: {preset: tiny}\ndata: {path: t.bin, token_dtype: uint16}\n"
           "train: {steps: " +
           std::to_string(steps) + ", seq_len: 8, micro_batch_size: 1}\noptimizer: {lr: 0.01}\n";
  }
  Job WaitForEnd(JobManager& manager, const std::string& id) {
    absl::Notification done;
    Job last;
    auto handle = manager.Watch(id, true, [&](const WatchJobEvent& e, bool end) {
      last = e.job();
      if (end) done.Notify();
    });
    EXPECT_TRUE(handle.ok());
    done.WaitForNotification();
    return last;
  }

  std::string dir_;
  MemoryJobStore store_;
  FakeWorker worker_;
  prometheus::Registry registry_;
};

TEST_F(JobManagerTest, RunsJobsInFifoOrderWithStepHistory) {
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    auto job = manager.Submit(Spec(4 + i), dir_);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->state(), QUEUED);
    ids.push_back(job->id());
  }
  ASSERT_TRUE(manager.Start().ok());
  for (const std::string& id : ids) EXPECT_EQ(WaitForEnd(manager, id).state(), SUCCEEDED);
  EXPECT_EQ(worker_.order(), ids);
  // A watch of an ended job sends its whole history at once.
  std::vector<StepRecord> steps;
  ASSERT_TRUE(manager
                  .Watch(ids[2], false,
                         [&](const WatchJobEvent& e, bool) {
                           steps.assign(e.steps().begin(), e.steps().end());
                         })
                  .ok());
  ASSERT_EQ(steps.size(), 6u);
  EXPECT_EQ(steps.back().step(), 6);
  EXPECT_EQ(manager.JobsByState()["SUCCEEDED"], 3);
}

// A store whose second job number takes 100 ms to hand out, as a slow disk might.
class SlowSecondNumberStore : public MemoryJobStore {
 public:
  absl::StatusOr<int64_t> NextJobNumber() override {
    absl::StatusOr<int64_t> n = MemoryJobStore::NextJobNumber();
    if (n.ok() && *n == 2) absl::SleepFor(absl::Milliseconds(100));
    return n;
  }
};

// Two clients submit at once while a job runs: the queue is in id order, whichever submit's
// number came back first.
TEST_F(JobManagerTest, ConcurrentSubmitsQueueInIdOrder) {
  SlowSecondNumberStore store;
  JobManager manager(&store, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  worker_.block_ = true;
  auto first = manager.Submit(Spec(1), dir_);
  ASSERT_TRUE(first.ok()) << first.status();
  worker_.started_.WaitForNotification();
  worker_.block_ = false;  // read again only by the next task, after the cancel below
  absl::StatusOr<Job> second, third;
  std::thread a([&] { second = manager.Submit(Spec(2), dir_); });
  absl::SleepFor(absl::Milliseconds(20));  // a's number is being handed out now
  std::thread b([&] { third = manager.Submit(Spec(3), dir_); });
  a.join();
  b.join();
  ASSERT_TRUE(second.ok() && third.ok()) << second.status() << " " << third.status();
  EXPECT_EQ(second->id(), "job-000002");
  EXPECT_EQ(third->id(), "job-000003");
  ASSERT_TRUE(manager.Cancel(first->id()).ok());
  WaitForEnd(manager, second->id());
  WaitForEnd(manager, third->id());
  EXPECT_EQ(worker_.order(),
            (std::vector<std::string>{first->id(), second->id(), third->id()}));
}

// A worker that keeps dying under a job without a checkpoint in between: the job is resumed
// (max_worker_failures - 1) times, then fails naming the worker and the count.
TEST_F(JobManagerTest, WorkerFailuresResumeTheJobThenFailIt) {
  worker_.fail_ = true;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  auto job = manager.Submit(Spec(2), dir_);
  ASSERT_TRUE(job.ok());
  Job end = WaitForEnd(manager, job->id());
  EXPECT_EQ(end.state(), FAILED);
  EXPECT_THAT(end.failure_reason(), HasSubstr("worker-0"));
  EXPECT_THAT(end.failure_reason(), HasSubstr("3 worker failures since the job's last checkpoint"));
  EXPECT_EQ(end.resumes(), 2);
  EXPECT_EQ(worker_.order().size(), 3u);
  // No checkpoint: every resume started over, and the history holds each step once.
  EXPECT_EQ(worker_.resumed_from(), (std::vector<std::string>{"", "", ""}));
  EXPECT_EQ(store_.Steps(job->id())->size(), 2u);
}

// The worker dies after step 5 with a checkpoint at step 4: the job goes back to the head of
// the queue (before a job submitted earlier than the crash), continues from step-4, and ends
// with one record per step, steps 5 and later from the second run.
TEST_F(JobManagerTest, WorkerDeathResumesFromTheLatestCheckpoint) {
  worker_.checkpoint_every_ = 2;
  worker_.die_after_step_ = 5;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  auto job = manager.Submit(Spec(8), dir_);
  auto next = manager.Submit(Spec(1), dir_);
  ASSERT_TRUE(job.ok() && next.ok());
  ASSERT_TRUE(manager.Start().ok());
  const Job end = WaitForEnd(manager, job->id());
  EXPECT_EQ(end.state(), SUCCEEDED) << end.failure_reason();
  EXPECT_EQ(end.resumes(), 1);
  EXPECT_THAT(end.resume_reason(), HasSubstr("worker-0: Socket closed"));
  EXPECT_EQ(end.resumed_from(), end.output_dir() + "/step-4");
  EXPECT_EQ(end.worker_failures(), 0);  // new checkpoints since
  auto steps = store_.Steps(job->id());
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 8u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ((*steps)[i].step(), i + 1);
    // Steps 1-4 from the first run, 5-8 from the second.
    EXPECT_DOUBLE_EQ((*steps)[i].loss(), 5.0 / (i + 1) + (i < 4 ? 0.001 : 0.002)) << i;
  }
  EXPECT_EQ(WaitForEnd(manager, next->id()).state(), SUCCEEDED);
  EXPECT_EQ(worker_.order(), (std::vector<std::string>{job->id(), job->id(), next->id()}));
  EXPECT_EQ(worker_.resumed_from(),
            (std::vector<std::string>{"", end.output_dir() + "/step-4", ""}));
}

bool Holds(MemstoreClient& memstore, const std::string& id) {
  char buf[16];
  return memstore.Read(id, buf, sizeof(buf)).ok();
}

TEST_F(JobManagerTest, WhatACrashedWorkerLeftInTheMemstoreIsFreed) {
  FakeMemstoreClient memstore;
  ASSERT_TRUE(memstore.Write("other-job/x", "abcd", 4, "float32", TIER_HOST).ok());
  worker_.fail_ = true;
  worker_.memstore_ = &memstore;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  manager.SetMemstore(&memstore);
  ASSERT_TRUE(manager.Start().ok());
  auto job = manager.Submit(Spec(2), dir_);
  ASSERT_TRUE(job.ok());
  // The job is published as ended once its tensors are freed, and says so.
  const Job end = WaitForEnd(manager, job->id());
  EXPECT_EQ(end.state(), FAILED);
  EXPECT_TRUE(end.tensors_freed());
  EXPECT_FALSE(Holds(memstore, job->id() + "/layers.0.params"));
  EXPECT_TRUE(Holds(memstore, "other-job/x"));
}

TEST_F(JobManagerTest, RestartFreesWhatJobsThatRanWithoutBeingCleanedUpLeft) {
  FakeMemstoreClient memstore;
  auto job = [&](const std::string& id, JobState state, bool started, bool freed) {
    ASSERT_TRUE(memstore.Write(id + "/m", "abcd", 4, "float32", TIER_HOST).ok());
    Job j;
    j.set_id(id);
    j.set_state(state);
    if (started) j.set_start_time_unix_ms(1000);
    j.set_tensors_freed(freed);
    ASSERT_TRUE(store_.PutJob(j).ok());
  };
  job("job-000001", RUNNING, true, false);    // the coordinator died while it ran
  job("job-000002", SUCCEEDED, true, true);   // cleaned up when it ended
  job("job-000003", FAILED, true, false);     // ended while the node was stopping
  job("job-000004", CANCELLED, false, false); // never ran: not asked about
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  manager.SetMemstore(&memstore);
  ASSERT_TRUE(manager.Start().ok());
  for (int i = 0; i < 500 && !manager.Get("job-000003")->tensors_freed(); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_FALSE(Holds(memstore, "job-000001/m"));
  EXPECT_TRUE(Holds(memstore, "job-000002/m"));
  EXPECT_FALSE(Holds(memstore, "job-000003/m"));
  EXPECT_TRUE(Holds(memstore, "job-000004/m"));
  // Recorded, so the next start does not ask again.
  manager.Stop();
  absl::StatusOr<std::vector<Job>> stored = store_.ListJobs();
  ASSERT_TRUE(stored.ok());
  for (const Job& j : *stored) {
    EXPECT_EQ(j.tensors_freed(), j.id() != "job-000004") << j.id();
  }
}

// The task of a job that was running when the coordinator died runs on in its worker until it
// notices: the restarted coordinator frees the job's tensors only once it has stopped.
TEST_F(JobManagerTest, RestartFreesAJobsTensorsOnlyOnceItsWorkerStoppedTheTask) {
  class RecordingMemstore : public FakeMemstoreClient {
   public:
    explicit RecordingMemstore(FakeWorker* worker) : worker_(worker) {}
    absl::StatusOr<FreeTensorsReply> FreeTensors(const std::string& prefix,
                                                 absl::Duration timeout) override {
      polls_left_at_free = worker_->lingering_polls();
      return FakeMemstoreClient::FreeTensors(prefix, timeout);
    }
    std::atomic<int> polls_left_at_free{-1};

   private:
    FakeWorker* const worker_;
  } memstore(&worker_);
  ASSERT_TRUE(memstore.Write("job-000001/m", "abcd", 4, "float32", TIER_HOST).ok());
  Job j;
  j.set_id("job-000001");
  j.set_state(RUNNING);
  j.set_start_time_unix_ms(1000);
  ASSERT_TRUE(store_.PutJob(j).ok());
  worker_.Linger("job-000001", 5);
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  manager.SetMemstore(&memstore);
  ASSERT_TRUE(manager.Start().ok());
  for (int i = 0; i < 500 && !manager.Get("job-000001")->tensors_freed(); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_FALSE(Holds(memstore, "job-000001/m"));
  EXPECT_EQ(memstore.polls_left_at_free, 0);
  manager.Stop();
}

TEST_F(JobManagerTest, CancelStopsARunningJobAndDropsAQueuedOne) {
  worker_.block_ = true;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  auto running = manager.Submit(Spec(2), dir_);
  auto queued = manager.Submit(Spec(2), dir_);
  ASSERT_TRUE(running.ok() && queued.ok());
  worker_.started_.WaitForNotification();
  EXPECT_EQ(manager.Cancel(queued->id())->state(), CANCELLED);
  ASSERT_TRUE(manager.Cancel(running->id()).ok());
  EXPECT_EQ(WaitForEnd(manager, running->id()).state(), CANCELLED);
  EXPECT_THAT(manager.Cancel("job-999999").status().message(), HasSubstr("no job job-999999"));
}

// The coordinator died while job 2 ran (its last checkpoint step 3, records up to step 5);
// job 1 was queued before it. On restart job 2 resumes first, from step-3.
TEST_F(JobManagerTest, RestartResumesTheJobThatWasRunning) {
  const std::string out = dir_ + "/restart-jobs/job-000002";
  std::filesystem::create_directories(out + "/step-3");
  Job queued;
  queued.set_id("job-000001");
  queued.set_state(QUEUED);
  ASSERT_TRUE(store_.PutJob(queued).ok());
  Job job;
  job.set_id("job-000002");
  job.set_state(RUNNING);
  job.set_worker("worker-0");
  job.set_start_time_unix_ms(1000);
  job.set_output_dir(out);
  job.set_final_checkpoint(out + "/step-3");
  job.mutable_spec()->mutable_train()->set_steps(6);
  for (int s = 1; s <= 5; ++s) {
    StepRecord step;
    step.set_step(s);
    step.set_loss(100);
    ASSERT_TRUE(store_.PutStep(job, step).ok());
  }
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  const Job end = WaitForEnd(manager, "job-000002");
  EXPECT_EQ(end.state(), SUCCEEDED) << end.failure_reason();
  EXPECT_EQ(end.resumes(), 1);
  EXPECT_THAT(end.resume_reason(), HasSubstr("coordinator stopped"));
  EXPECT_EQ(end.start_time_unix_ms(), 1000);  // the first run's
  EXPECT_EQ(worker_.order().front(), "job-000002");
  EXPECT_EQ(worker_.resumed_from().front(), out + "/step-3");
  auto steps = store_.Steps("job-000002");
  ASSERT_EQ(steps->size(), 6u);
  EXPECT_EQ((*steps)[2].loss(), 100);  // kept: at or before the checkpoint
  EXPECT_NE((*steps)[3].loss(), 100);  // trained again
  EXPECT_EQ(WaitForEnd(manager, "job-000001").state(), SUCCEEDED);
}

// lumend stopping the node while a job runs: the job is stored QUEUED (not FAILED) and the
// next start runs it again.
TEST_F(JobManagerTest, StoppingMidJobQueuesItForTheNextStart) {
  worker_.block_ = true;
  std::string id;
  {
    JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
    ASSERT_TRUE(manager.Start().ok());
    auto job = manager.Submit(Spec(2), dir_);
    ASSERT_TRUE(job.ok());
    id = job->id();
    worker_.started_.WaitForNotification();
    manager.Stop();
  }
  auto stored = store_.ListJobs();
  ASSERT_TRUE(stored.ok());
  ASSERT_EQ(stored->size(), 1u);
  EXPECT_EQ((*stored)[0].state(), QUEUED);
  EXPECT_EQ((*stored)[0].resumes(), 1);
  EXPECT_THAT((*stored)[0].resume_reason(), HasSubstr("coordinator stopped"));
  worker_.block_ = false;
  prometheus::Registry registry;
  JobManager again(&store_, {&worker_}, {dir_, NodeLimits{}}, registry);
  ASSERT_TRUE(again.Start().ok());
  EXPECT_EQ(WaitForEnd(again, id).state(), SUCCEEDED);
}

TEST_F(JobManagerTest, InvalidSpecIsRejectedAndNothingIsQueued) {
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  auto job = manager.Submit("model: {preset: tiny, num_attention_heads: 3}\n", dir_);
  ASSERT_FALSE(job.ok());
  EXPECT_THAT(std::string(job.status().message()), HasSubstr("model.num_attention_heads: 3"));
  EXPECT_TRUE(manager.List().empty());
}

TEST_F(JobManagerTest, PlanGoesToTheWorkerAndItsPredictionIntoEveryStep) {
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  int calls = 0;
  manager.SetJobPlanner([&calls](const JobSpec& spec) -> absl::StatusOr<StepSchedule> {
    ++calls;
    if (spec.train().steps() == 3) return absl::FailedPreconditionError("no figures");
    StepSchedule schedule;
    schedule.set_predicted_step_time_s(2.5);
    schedule.add_ops()->set_label("fwd embed g0");
    return schedule;
  });
  ASSERT_TRUE(manager.Start().ok());
  auto job = manager.Submit(Spec(2), dir_);
  ASSERT_TRUE(job.ok());
  Job end = WaitForEnd(manager, job->id());
  EXPECT_EQ(end.state(), SUCCEEDED);
  EXPECT_EQ(end.predicted_step_time_s(), 2.5);
  std::vector<StepRecord> steps;
  ASSERT_TRUE(manager
                  .Watch(job->id(), false,
                         [&](const WatchJobEvent& e, bool) {
                           steps.assign(e.steps().begin(), e.steps().end());
                         })
                  .ok());
  ASSERT_EQ(steps.size(), 2u);
  for (const StepRecord& s : steps) EXPECT_EQ(s.predicted_step_time_s(), 2.5);
  // A node that cannot predict still runs the job.
  auto unpredicted = manager.Submit(Spec(3), dir_);
  ASSERT_TRUE(unpredicted.ok());
  Job end3 = WaitForEnd(manager, unpredicted->id());
  EXPECT_EQ(end3.state(), SUCCEEDED);
  EXPECT_EQ(end3.predicted_step_time_s(), 0);
  EXPECT_EQ(calls, 2);
  // The worker got the schedule with the first task, and none with the second.
  const std::vector<StepSchedule> schedules = worker_.schedules();
  ASSERT_EQ(schedules.size(), 2u);
  ASSERT_EQ(schedules[0].ops_size(), 1);
  EXPECT_EQ(schedules[0].ops(0).label(), "fwd embed g0");
  EXPECT_EQ(schedules[1].ops_size(), 0);
}

TEST_F(JobManagerTest, JobTheWorkerCannotFitIsRejectedAtSubmit) {
  worker_.max_micro_batch_ = 1;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  std::string spec = Spec(2);
  spec.replace(spec.find("micro_batch_size: 1"), 19, "micro_batch_size: 2");
  auto job = manager.Submit(spec, dir_);
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(job.status().message()),
              HasSubstr("does not fit this node: the backward of layer 1 needs 9 MiB"));
  EXPECT_TRUE(manager.List().empty());
  EXPECT_TRUE(manager.Submit(Spec(2), dir_).ok());
}

// A worker whose tasks run one step, then wait until the test lets one finish; CheckTask claims
// what `claims` says for the job's name (nothing otherwise), or UNAVAILABLE for names made
// Unreachable.
class GatedWorker : public WorkerClient {
 public:
  explicit GatedWorker(std::string name) : name_(std::move(name)) {}
  const std::string& name() const override { return name_; }
  absl::Status RunTask(const RunTaskRequest& request,
                       const std::function<void(const TaskEvent&)>& on_event) override {
    TaskEvent event;
    event.mutable_step()->set_step(1);
    event.mutable_step()->set_tokens(8);
    on_event(event);
    absl::MutexLock lock(&mu_);
    replicas_.emplace_back(request.rank(), request.world_size());
    schedule_ops_.push_back(request.schedule().ops_size());

    auto free = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return finishes_ > 0 || cancelled_ || killed_;
    };
    mu_.Await(absl::Condition(&free));
    if (killed_) {
      killed_ = false;
      return absl::UnavailableError(absl::StrCat(name_, ": Socket closed"));
    }
    if (cancelled_) {
      cancelled_ = false;
      return absl::CancelledError("cancelled");
    }
    --finishes_;
    if (out_of_memory_.count(request.spec().name())) {
      return absl::ResourceExhaustedError(
          absl::StrCat(name_, ": the memstore's host tier is full"));
    }
    return absl::OkStatus();
  }
  void CancelTask(const std::string&) override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }
  absl::StatusOr<WorkerInfo> GetInfo(absl::Duration) override { return WorkerInfo(); }
  absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec, int64_t,
                                           absl::Duration) override {
    {
      absl::MutexLock lock(&mu_);
      if (unreachable_.count(spec.name())) return absl::UnavailableError("still starting");
    }
    auto it = claims.find(spec.name());
    return it == claims.end() ? ResourceClaims() : it->second;
  }
  // The running (or the next) task fails as if the worker died.
  void Kill() {
    absl::MutexLock lock(&mu_);
    killed_ = true;
  }
  // (rank, world_size) of each task it was given.
  std::vector<std::pair<int, int>> replicas() {
    absl::MutexLock lock(&mu_);
    return replicas_;
  }
  // The schedule ops each task came with.
  std::vector<int> schedule_ops() {
    absl::MutexLock lock(&mu_);
    return schedule_ops_;
  }
  // Lets the running (or the next) task end.
  void FinishOne() {
    absl::MutexLock lock(&mu_);
    ++finishes_;
  }

  // Jobs (by name) whose runs end RESOURCE_EXHAUSTED.
  void OutOfMemory(const std::string& name, bool on) {
    absl::MutexLock lock(&mu_);
    if (on) {
      out_of_memory_.insert(name);
    } else {
      out_of_memory_.erase(name);
    }
  }

  // CheckTask of job `name` fails UNAVAILABLE (as a worker still starting) or answers.
  void Unreachable(const std::string& name, bool on) {
    absl::MutexLock lock(&mu_);
    if (on) {
      unreachable_.insert(name);
    } else {
      unreachable_.erase(name);
    }
  }

  // Set before the manager starts.
  std::map<std::string, ResourceClaims> claims;

 private:
  const std::string name_;
  absl::Mutex mu_;
  int finishes_ ABSL_GUARDED_BY(mu_) = 0;
  bool killed_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::pair<int, int>> replicas_ ABSL_GUARDED_BY(mu_);
  std::vector<int> schedule_ops_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> out_of_memory_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> unreachable_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

// A memstore of 100 MiB of host memory and 1 GiB of NVMe.
class HundredMiBMemstore : public FakeMemstoreClient {
 public:
  absl::StatusOr<GetMemstoreStatsReply> GetStats(absl::Duration) override {
    GetMemstoreStatsReply reply;
    TierInfo* host = reply.add_tiers();
    host->set_name("host");
    host->set_capacity_bytes(100 << 20);
    TierInfo* nvme = reply.add_tiers();
    nvme->set_name("nvme:fake");
    nvme->set_capacity_bytes(1 << 30);
    return reply;
  }
};

// The value of gauge `name`{share=`share`} in `registry`; -2 when absent.
double ShareGauge(prometheus::Registry& registry, const std::string& name,
                  const std::string& share) {
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& metric : family.metric) {
      for (const prometheus::ClientMetric::Label& label : metric.label) {
        if (label.name == "share" && label.value == share) return metric.gauge.value;
      }
    }
  }
  return -2;
}

ResourceClaims MemstoreHostClaim(int64_t mib) {
  ResourceClaims c;
  c.set_memstore_host_bytes(mib << 20);
  c.set_worker_host_bytes(1 << 20);
  return c;
}

class SideBySideTest : public JobManagerTest {
 protected:
  std::string Named(const std::string& name) { return "name: " + name + "\n" + Spec(1); }
  // Waits until `id` is in `state`; false after 30 s.
  bool WaitForState(JobManager& manager, const std::string& id, JobState state) {
    for (int i = 0; i < 3000; ++i) {
      absl::StatusOr<Job> job = manager.Get(id);
      if (job.ok() && job->state() == state) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }
  // Waits until the head job's wait_reason is set (the dispatcher looks every 2 s).
  std::string WaitReason(JobManager& manager, const std::string& id) {
    for (int i = 0; i < 1000; ++i) {
      absl::StatusOr<Job> job = manager.Get(id);
      if (job.ok() && !job->wait_reason().empty()) return job->wait_reason();
      absl::SleepFor(absl::Milliseconds(10));
    }
    return "";
  }

  // Lets running job `id` end, on whichever worker runs it; false when it is not running.
  bool Finish(JobManager& manager, const std::string& id) {
    absl::StatusOr<Job> job = manager.Get(id);
    if (!job.ok() || job->state() != RUNNING) return false;
    for (const absl::string_view name : absl::StrSplit(job->worker(), ',')) {
      for (GatedWorker* w : {&a_, &b_, &c_}) {
        if (w->name() == name) w->FinishOne();
      }
    }
    return true;
  }

  GatedWorker a_{"worker-0"};
  GatedWorker b_{"worker-1"};
  GatedWorker c_{"worker-2"};
};

// Two workers run the first two jobs at once; the third waits for a free worker.
TEST_F(SideBySideTest, EachIdleWorkerTakesTheNextJob) {
  JobManager manager(&store_, {&a_, &b_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  std::vector<std::string> ids;
  for (const char* name : {"one", "two", "three"}) {
    absl::StatusOr<Job> job = manager.Submit(Named(name), dir_);
    ASSERT_TRUE(job.ok()) << job.status();
    ids.push_back(job->id());
  }
  ASSERT_TRUE(WaitForState(manager, ids[0], RUNNING));
  ASSERT_TRUE(WaitForState(manager, ids[1], RUNNING));
  EXPECT_NE(manager.Get(ids[0])->worker(), manager.Get(ids[1])->worker());
  absl::SleepFor(absl::Milliseconds(2500));  // past a dispatcher round
  EXPECT_EQ(manager.Get(ids[2])->state(), QUEUED);
  EXPECT_EQ(manager.Get(ids[2])->wait_reason(), "");  // no worker is free: nothing to explain
  EXPECT_EQ(manager.JobsByState()["RUNNING"], 2);
  const std::string second_worker = manager.Get(ids[1])->worker();
  ASSERT_TRUE(Finish(manager, ids[1]));
  EXPECT_EQ(WaitForEnd(manager, ids[1]).state(), SUCCEEDED);
  ASSERT_TRUE(WaitForState(manager, ids[2], RUNNING));
  EXPECT_EQ(manager.Get(ids[2])->worker(), second_worker);  // the one that became free
  ASSERT_TRUE(Finish(manager, ids[0]));
  ASSERT_TRUE(Finish(manager, ids[2]));
  for (const std::string& id : ids) EXPECT_EQ(WaitForEnd(manager, id).state(), SUCCEEDED);
}

// The head job waits while its claims do not fit beside the running jobs' though a worker is
// free, says why, and later jobs do not pass it.
TEST_F(SideBySideTest, HeadWaitsUntilItsClaimsFit) {
  HundredMiBMemstore memstore;
  a_.claims["big1"] = b_.claims["big1"] = MemstoreHostClaim(60);
  a_.claims["big2"] = b_.claims["big2"] = MemstoreHostClaim(60);
  JobManager manager(&store_, {&a_, &b_, &c_}, {dir_, NodeLimits{}}, registry_);
  manager.SetMemstore(&memstore);
  ASSERT_TRUE(manager.Start().ok());
  absl::StatusOr<Job> big1 = manager.Submit(Named("big1"), dir_);
  ASSERT_TRUE(big1.ok()) << big1.status();
  EXPECT_EQ(big1->claims().memstore_host_bytes(), 60 << 20);
  ASSERT_TRUE(WaitForState(manager, big1->id(), RUNNING));
  absl::StatusOr<Job> big2 = manager.Submit(Named("big2"), dir_);
  absl::StatusOr<Job> small = manager.Submit(Named("small"), dir_);
  ASSERT_TRUE(big2.ok() && small.ok());
  const std::string why = WaitReason(manager, big2->id());
  EXPECT_THAT(why, HasSubstr("the memstore's host tier: needs 60.0 MiB"));
  EXPECT_THAT(why, HasSubstr(big1->id() + " hold 60.0 MiB of 100.0 MiB"));
  EXPECT_EQ(manager.Get(big2->id())->state(), QUEUED);
  EXPECT_EQ(manager.Get(small->id())->state(), QUEUED);  // FIFO: it does not pass big2
  // Exported for the dashboard: what the running jobs hold against the capacity.
  EXPECT_EQ(ShareGauge(registry_, "lumen_node_claimed_bytes", "memstore_host"), 60 << 20);
  EXPECT_EQ(ShareGauge(registry_, "lumen_node_share_capacity_bytes", "memstore_host"),
            100 << 20);
  EXPECT_EQ(ShareGauge(registry_, "lumen_node_claimed_bytes", "worker_host"), 1 << 20);
  ASSERT_TRUE(Finish(manager, big1->id()));
  EXPECT_EQ(WaitForEnd(manager, big1->id()).state(), SUCCEEDED);
  ASSERT_TRUE(WaitForState(manager, big2->id(), RUNNING));
  EXPECT_EQ(manager.Get(big2->id())->wait_reason(), "");
  // small claims nothing of the memstore: it runs beside big2.
  ASSERT_TRUE(WaitForState(manager, small->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, big2->id()));
  ASSERT_TRUE(Finish(manager, small->id()));
  EXPECT_EQ(WaitForEnd(manager, big2->id()).state(), SUCCEEDED);
  EXPECT_EQ(WaitForEnd(manager, small->id()).state(), SUCCEEDED);
}

// A job submitted while no worker could answer is sized once one can: it then runs beside
// others like any job.
TEST_F(SideBySideTest, JobSubmittedWhileWorkersStartIsSizedLater) {
  a_.Unreachable("early", true);
  a_.claims["early"].set_worker_host_bytes(1 << 20);
  JobManager manager(&store_, {&a_, &b_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  absl::StatusOr<Job> first = manager.Submit(Named("first"), dir_);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(WaitForState(manager, first->id(), RUNNING));
  absl::StatusOr<Job> early = manager.Submit(Named("early"), dir_);
  ASSERT_TRUE(early.ok());
  EXPECT_FALSE(early->has_claims());
  a_.Unreachable("early", false);  // the worker is ready now
  ASSERT_TRUE(WaitForState(manager, early->id(), RUNNING));  // beside `first`
  EXPECT_EQ(manager.Get(early->id())->claims().worker_host_bytes(), 1 << 20);
  // One that started alone, unsized, is sized while it runs: others may then run beside it.
  b_.Unreachable("alone", true);
  a_.Unreachable("alone", true);
  ASSERT_TRUE(Finish(manager, first->id()));
  ASSERT_TRUE(Finish(manager, early->id()));
  EXPECT_EQ(WaitForEnd(manager, early->id()).state(), SUCCEEDED);
  absl::StatusOr<Job> alone = manager.Submit(Named("alone"), dir_);
  ASSERT_TRUE(alone.ok());
  EXPECT_FALSE(alone->has_claims());
  ASSERT_TRUE(WaitForState(manager, alone->id(), RUNNING));
  a_.Unreachable("alone", false);
  absl::StatusOr<Job> next = manager.Submit(Named("next"), dir_);
  ASSERT_TRUE(next.ok());
  ASSERT_TRUE(WaitForState(manager, next->id(), RUNNING));  // beside `alone`, once sized
  EXPECT_TRUE(manager.Get(alone->id())->has_claims());
  ASSERT_TRUE(Finish(manager, alone->id()));
  ASSERT_TRUE(Finish(manager, next->id()));
  EXPECT_EQ(WaitForEnd(manager, next->id()).state(), SUCCEEDED);
}

// A job whose claims are unknown (the worker could not be asked at submit) runs alone.
TEST_F(SideBySideTest, JobWithUnknownClaimsRunsAlone) {
  a_.Unreachable("unknown", true);
  JobManager manager(&store_, {&a_, &b_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  absl::StatusOr<Job> first = manager.Submit(Named("first"), dir_);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(WaitForState(manager, first->id(), RUNNING));
  absl::StatusOr<Job> unknown = manager.Submit(Named("unknown"), dir_);
  ASSERT_TRUE(unknown.ok()) << unknown.status();
  EXPECT_FALSE(unknown->has_claims());
  EXPECT_THAT(WaitReason(manager, unknown->id()), HasSubstr("it runs alone"));
  ASSERT_TRUE(Finish(manager, first->id()));
  EXPECT_EQ(WaitForEnd(manager, first->id()).state(), SUCCEEDED);
  absl::StatusOr<Job> after = manager.Submit(Named("after"), dir_);
  ASSERT_TRUE(after.ok());
  ASSERT_TRUE(WaitForState(manager, unknown->id(), RUNNING));
  absl::SleepFor(absl::Milliseconds(2500));
  EXPECT_EQ(manager.Get(after->id())->state(), QUEUED);  // not beside the unknown one
  EXPECT_THAT(manager.Get(after->id())->wait_reason(), HasSubstr(unknown->id() + " runs alone"));
  ASSERT_TRUE(Finish(manager, unknown->id()));
  EXPECT_EQ(WaitForEnd(manager, unknown->id()).state(), SUCCEEDED);
  ASSERT_TRUE(WaitForState(manager, after->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, after->id()));
  EXPECT_EQ(WaitForEnd(manager, after->id()).state(), SUCCEEDED);
}

// A job that runs out of memory beside another is queued again to resume alone; one that runs
// out of memory alone fails.
TEST_F(SideBySideTest, OutOfMemoryBesideOthersResumesAlone) {
  for (GatedWorker* w : {&a_, &b_}) w->OutOfMemory("victim", true);
  JobManager manager(&store_, {&a_, &b_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  absl::StatusOr<Job> hog = manager.Submit(Named("hog"), dir_);
  absl::StatusOr<Job> victim = manager.Submit(Named("victim"), dir_);
  ASSERT_TRUE(hog.ok() && victim.ok());
  ASSERT_TRUE(WaitForState(manager, hog->id(), RUNNING));
  ASSERT_TRUE(WaitForState(manager, victim->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, victim->id()));
  ASSERT_TRUE(WaitForState(manager, victim->id(), QUEUED));
  Job queued = *manager.Get(victim->id());
  EXPECT_TRUE(queued.runs_alone());
  EXPECT_EQ(queued.resumes(), 1);
  EXPECT_THAT(queued.resume_reason(), HasSubstr("the memstore's host tier is full"));
  EXPECT_THAT(queued.resume_reason(),
              HasSubstr("out of memory beside " + hog->id() + "; it runs alone from now on"));
  EXPECT_THAT(WaitReason(manager, victim->id()), HasSubstr("it ran out of memory beside"));
  // Alone, it still runs out of memory: then it fails.
  ASSERT_TRUE(Finish(manager, hog->id()));
  EXPECT_EQ(WaitForEnd(manager, hog->id()).state(), SUCCEEDED);
  ASSERT_TRUE(WaitForState(manager, victim->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, victim->id()));
  const Job failed = WaitForEnd(manager, victim->id());
  EXPECT_EQ(failed.state(), FAILED);
  EXPECT_THAT(failed.failure_reason(), HasSubstr("the memstore's host tier is full"));
  // A job that has room alone succeeds after such a retry.
  for (GatedWorker* w : {&a_, &b_}) w->OutOfMemory("victim", false);
  for (GatedWorker* w : {&a_, &b_}) w->OutOfMemory("lucky", true);
  absl::StatusOr<Job> first = manager.Submit(Named("first"), dir_);
  absl::StatusOr<Job> lucky = manager.Submit(Named("lucky"), dir_);
  ASSERT_TRUE(first.ok() && lucky.ok());
  ASSERT_TRUE(WaitForState(manager, first->id(), RUNNING));
  ASSERT_TRUE(WaitForState(manager, lucky->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, lucky->id()));
  ASSERT_TRUE(WaitForState(manager, lucky->id(), QUEUED));
  for (GatedWorker* w : {&a_, &b_}) w->OutOfMemory("lucky", false);
  ASSERT_TRUE(Finish(manager, first->id()));
  ASSERT_TRUE(WaitForState(manager, lucky->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, lucky->id()));
  EXPECT_EQ(WaitForEnd(manager, lucky->id()).state(), SUCCEEDED);
}

// A job on two workers waits for two free ones and runs a replica on each (ranks 0 and 1);
// a replica that fails stops the other, and the job resumes like any interrupted one.
TEST_F(SideBySideTest, JobOnTwoWorkersRunsAReplicaOnEach) {
  auto pair = [](const std::string& name) {
    return "name: " + name +
           "\nmodel: {preset: tiny}\ndata: {path: t.bin, token_dtype: uint16}\n"
           "train: {steps: 1, seq_len: 8, micro_batch_size: 1, grad_accum_steps: 2}\n"
           "optimizer: {lr: 0.01}\nresources: {workers: 2}\n";
  };
  NodeLimits three;
  three.workers = 3;
  JobManager manager(&store_, {&a_, &b_, &c_}, {dir_, three}, registry_);
  // The planner predicts the replicas' step (it plans them as data-parallel); they get no
  // schedule, which is planned for one worker.
  manager.SetJobPlanner([](const JobSpec& spec) -> absl::StatusOr<StepSchedule> {
    StepSchedule schedule;
    schedule.set_predicted_step_time_s(spec.resources().workers() == 2 ? 1.5 : 3.0);
    schedule.add_ops()->set_label("fwd embed g0");
    return schedule;
  });
  ASSERT_TRUE(manager.Start().ok());
  absl::StatusOr<Job> solo = manager.Submit(Named("solo"), dir_);
  ASSERT_TRUE(solo.ok()) << solo.status();
  ASSERT_TRUE(WaitForState(manager, solo->id(), RUNNING));
  absl::StatusOr<Job> first = manager.Submit(pair("first"), dir_);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(WaitForState(manager, first->id(), RUNNING));
  EXPECT_EQ(manager.Get(first->id())->worker(), "worker-1,worker-2");
  for (GatedWorker* w : {&b_, &c_}) {  // their tasks have started once RUNNING is published
    for (int i = 0; i < 3000 && w->replicas().empty(); ++i) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(b_.replicas().size(), 1u);
  ASSERT_EQ(c_.replicas().size(), 1u);
  EXPECT_EQ(b_.replicas().back(), std::make_pair(0, 2));
  EXPECT_EQ(c_.replicas().back(), std::make_pair(1, 2));
  EXPECT_EQ(manager.Get(first->id())->predicted_step_time_s(), 1.5);
  EXPECT_EQ(b_.schedule_ops().back(), 0);
  EXPECT_EQ(c_.schedule_ops().back(), 0);
  EXPECT_EQ(a_.schedule_ops().back(), 1);  // the single-worker job's
  // Another pair waits: one worker frees, it needs two.
  absl::StatusOr<Job> second = manager.Submit(pair("second"), dir_);
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(Finish(manager, solo->id()));
  EXPECT_EQ(WaitForEnd(manager, solo->id()).state(), SUCCEEDED);
  EXPECT_EQ(WaitReason(manager, second->id()), "it trains on 2 workers; 1 is free");
  // worker-2 dies under the first pair: worker-1's replica is stopped, and the job goes back
  // to the head of the queue to resume; it runs again on the first two free workers.
  c_.Kill();
  Job again;
  for (int i = 0; i < 3000; ++i) {
    again = *manager.Get(first->id());
    if (again.resumes() == 1 && again.state() == RUNNING) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(again.state(), RUNNING);
  EXPECT_EQ(again.resumes(), 1);
  EXPECT_THAT(again.resume_reason(), HasSubstr("worker-2: Socket closed"));
  EXPECT_EQ(again.worker(), "worker-0,worker-1");
  EXPECT_EQ(manager.Get(second->id())->state(), QUEUED);
  ASSERT_TRUE(Finish(manager, first->id()));
  EXPECT_EQ(WaitForEnd(manager, first->id()).state(), SUCCEEDED);
  ASSERT_TRUE(WaitForState(manager, second->id(), RUNNING));
  ASSERT_TRUE(Finish(manager, second->id()));
  EXPECT_EQ(WaitForEnd(manager, second->id()).state(), SUCCEEDED);
}

// Stopping the manager cancels every running job and stores each to resume.
TEST_F(SideBySideTest, StopQueuesEveryRunningJob) {
  std::vector<std::string> ids;
  {
    JobManager manager(&store_, {&a_, &b_}, {dir_, NodeLimits{}}, registry_);
    ASSERT_TRUE(manager.Start().ok());
    for (const char* name : {"one", "two"}) {
      absl::StatusOr<Job> job = manager.Submit(Named(name), dir_);
      ASSERT_TRUE(job.ok());
      ids.push_back(job->id());
    }
    ASSERT_TRUE(WaitForState(manager, ids[0], RUNNING));
    ASSERT_TRUE(WaitForState(manager, ids[1], RUNNING));
    manager.Stop();
  }
  absl::StatusOr<std::vector<Job>> stored = store_.ListJobs();
  ASSERT_TRUE(stored.ok());
  ASSERT_EQ(stored->size(), 2u);
  for (const Job& job : *stored) {
    EXPECT_EQ(job.state(), QUEUED) << job.id();
    EXPECT_EQ(job.resumes(), 1) << job.id();
  }
}

}  // namespace
}  // namespace lumen
