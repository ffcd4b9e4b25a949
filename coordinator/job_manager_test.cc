#include "coordinator/job_manager.h"

#include <fstream>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Emits one step event per train step; can be told to fail or to block until cancelled.
class FakeWorker : public WorkerClient {
 public:
  const std::string& name() const override { return name_; }
  absl::Status RunTask(const RunTaskRequest& request,
                       const std::function<void(const TaskEvent&)>& on_event) override {
    {
      absl::MutexLock lock(&mu_);
      order_.push_back(request.job_id());
      schedules_.push_back(request.schedule());
    }
    for (int64_t s = 1; s <= request.spec().train().steps(); ++s) {
      TaskEvent event;
      event.mutable_step()->set_step(s);
      event.mutable_step()->set_loss(5.0 / s);
      event.mutable_step()->set_tokens(100);
      on_event(event);
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
  absl::StatusOr<WorkerInfo> GetInfo(absl::Duration) override { return WorkerInfo(); }
  absl::Status CheckTask(const JobSpec& spec, absl::Duration) override {
    if (spec.train().micro_batch_size() > max_micro_batch_) {
      return absl::ResourceExhaustedError("the backward of layer 1 needs 9 MiB");
    }
    return absl::OkStatus();
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

  bool fail_ = false;
  bool block_ = false;
  MemstoreClient* memstore_ = nullptr;
  absl::Notification started_;

 private:
  const std::string name_ = "worker-0";
  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::string> order_ ABSL_GUARDED_BY(mu_);
  std::vector<StepSchedule> schedules_ ABSL_GUARDED_BY(mu_);
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

TEST_F(JobManagerTest, WorkerFailureFailsTheJobNamingTheWorker) {
  worker_.fail_ = true;
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  auto job = manager.Submit(Spec(2), dir_);
  ASSERT_TRUE(job.ok());
  Job end = WaitForEnd(manager, job->id());
  EXPECT_EQ(end.state(), FAILED);
  EXPECT_THAT(end.failure_reason(), HasSubstr("worker-0"));
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

TEST_F(JobManagerTest, RestartFailsTheJobThatWasRunning) {
  Job job;
  job.set_id("job-000001");
  job.set_state(RUNNING);
  job.set_worker("worker-0");
  ASSERT_TRUE(store_.PutJob(job).ok());
  JobManager manager(&store_, {&worker_}, {dir_, NodeLimits{}}, registry_);
  ASSERT_TRUE(manager.Start().ok());
  auto loaded = manager.Get("job-000001");
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->state(), FAILED);
  EXPECT_THAT(loaded->failure_reason(), HasSubstr("coordinator stopped"));
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

}  // namespace
}  // namespace lumen
