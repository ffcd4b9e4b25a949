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

TEST(RocksDbJobStoreTest, OpenFailureNamesThePath) {
  auto store = RocksDbJobStore::Open("/proc/no/such/dir");
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("/proc/no/such/dir"), absl::string_view::npos);
}

}  // namespace
}  // namespace lumen
