#include "coordinator/job_store.h"

#include <filesystem>

#include "gtest/gtest.h"

namespace lumen {
namespace {

std::string TempDb(const std::string& name) {
  const std::string dir =
      std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/" + name;
  std::filesystem::remove_all(dir);
  return dir;
}

TEST(RocksDbJobStoreTest, JobsStepsAndIdsSurviveReopen) {
  const std::string path = TempDb("jobs_db");
  {
    auto store = RocksDbJobStore::Open(path);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ(*(*store)->NextJobNumber(), 1);
    EXPECT_EQ(*(*store)->NextJobNumber(), 2);
    Job job;
    job.set_id("job-000002");
    job.set_state(RUNNING);
    ASSERT_TRUE((*store)->PutJob(job).ok());
    for (int s = 1; s <= 12; ++s) {
      StepRecord step;
      step.set_step(s);
      step.set_loss(10.0 / s);
      *job.mutable_latest_step() = step;
      ASSERT_TRUE((*store)->PutStep(job, step).ok());
    }
    Job other;
    other.set_id("job-000001");
    other.set_state(SUCCEEDED);
    ASSERT_TRUE((*store)->PutJob(other).ok());
  }
  auto store = RocksDbJobStore::Open(path);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(*(*store)->NextJobNumber(), 3);
  auto jobs = (*store)->ListJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].id(), "job-000001");
  EXPECT_EQ((*jobs)[1].latest_step().step(), 12);
  auto steps = (*store)->Steps("job-000002");
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 12u);
  for (int i = 0; i < 12; ++i) EXPECT_EQ((*steps)[i].step(), i + 1);  // numeric, not lexical
  EXPECT_TRUE((*store)->Steps("job-000001")->empty());
}

// A resumed job drops the records after its checkpoint and writes those steps again; other
// jobs' records stay. Both stores behave alike.
void ExpectDropStepsAfter(JobStore* store) {
  Job job, other;
  job.set_id("job-000007");
  other.set_id("job-000008");
  for (int s = 1; s <= 9; ++s) {
    StepRecord step;
    step.set_step(s);
    step.set_loss(s);
    ASSERT_TRUE(store->PutStep(job, step).ok());
    ASSERT_TRUE(store->PutStep(other, step).ok());
  }
  job.set_state(QUEUED);
  ASSERT_TRUE(store->DropStepsAfter(job, 5).ok());
  auto steps = store->Steps(job.id());
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 5u);
  EXPECT_EQ(steps->back().step(), 5);
  EXPECT_EQ(store->Steps(other.id())->size(), 9u);
  EXPECT_EQ((*store->ListJobs())[0].state(), QUEUED);  // stored with the drop
  StepRecord again;
  again.set_step(6);
  again.set_loss(60);
  ASSERT_TRUE(store->PutStep(job, again).ok());
  ASSERT_TRUE(store->PutStep(job, again).ok());  // the same step replaces, not appends
  steps = store->Steps(job.id());
  ASSERT_EQ(steps->size(), 6u);
  EXPECT_EQ(steps->back().loss(), 60);
  ASSERT_TRUE(store->DropStepsAfter(job, 0).ok());
  EXPECT_TRUE(store->Steps(job.id())->empty());
}

TEST(RocksDbJobStoreTest, DropStepsAfter) {
  auto store = RocksDbJobStore::Open(TempDb("drop_db"));
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectDropStepsAfter(store->get());
}

TEST(MemoryJobStoreTest, DropStepsAfter) {
  MemoryJobStore store;
  ExpectDropStepsAfter(&store);
}

TEST(RocksDbJobStoreTest, OpenFailureNamesThePath) {
  auto store = RocksDbJobStore::Open("/proc/no/such/dir");
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("/proc/no/such/dir"), absl::string_view::npos);
}

}  // namespace
}  // namespace lumen
