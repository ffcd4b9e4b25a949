// Durable job records and their per-step history. Implementations are thread-safe.
#ifndef LUMEN_COORDINATOR_JOB_STORE_H_
#define LUMEN_COORDINATOR_JOB_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/job.pb.h"

namespace rocksdb {
class DB;
}

namespace lumen {

class JobStore {
 public:
  virtual ~JobStore() = default;
  // Returns a number never returned before by this store (survives restarts).
  virtual absl::StatusOr<int64_t> NextJobNumber() = 0;
  // Creates or replaces the record of `job.id()`.
  virtual absl::Status PutJob(const Job& job) = 0;
  // Every job, in id order.
  virtual absl::StatusOr<std::vector<Job>> ListJobs() = 0;
  // Stores a step record (replacing one of the same step) and `job` (whose latest_step is
  // usually that record) together.
  virtual absl::Status PutStep(const Job& job, const StepRecord& step) = 0;
  // Step records of a job in step order.
  virtual absl::StatusOr<std::vector<StepRecord>> Steps(const std::string& job_id) = 0;
  // Removes the job's step records after `step` and stores `job`, together: a job resumed
  // from its checkpoint of `step` trains the steps after it again.
  virtual absl::Status DropStepsAfter(const Job& job, int64_t step) = 0;
};

// Jobs in a RocksDB database at `path` (created if missing).
class RocksDbJobStore : public JobStore {
 public:
  static absl::StatusOr<std::unique_ptr<RocksDbJobStore>> Open(const std::string& path);
  ~RocksDbJobStore() override;

  absl::StatusOr<int64_t> NextJobNumber() override;
  absl::Status PutJob(const Job& job) override;
  absl::StatusOr<std::vector<Job>> ListJobs() override;
  absl::Status PutStep(const Job& job, const StepRecord& step) override;
  absl::StatusOr<std::vector<StepRecord>> Steps(const std::string& job_id) override;
  absl::Status DropStepsAfter(const Job& job, int64_t step) override;

 private:
  RocksDbJobStore(std::unique_ptr<rocksdb::DB> db, std::string path);
  const std::unique_ptr<rocksdb::DB> db_;
  const std::string path_;
  absl::Mutex mu_;  // Serialises NextJobNumber's read-modify-write.
};

// For tests.
class MemoryJobStore : public JobStore {
 public:
  absl::StatusOr<int64_t> NextJobNumber() override;
  absl::Status PutJob(const Job& job) override;
  absl::StatusOr<std::vector<Job>> ListJobs() override;
  absl::Status PutStep(const Job& job, const StepRecord& step) override;
  absl::StatusOr<std::vector<StepRecord>> Steps(const std::string& job_id) override;
  absl::Status DropStepsAfter(const Job& job, int64_t step) override;

 private:
  absl::Mutex mu_;
  int64_t next_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::map<int64_t, StepRecord>> steps_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_JOB_STORE_H_
