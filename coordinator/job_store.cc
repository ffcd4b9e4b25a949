#include "coordinator/job_store.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "rocksdb/db.h"
#include "rocksdb/write_batch.h"

namespace lumen {
namespace {

// Keys: "meta/next_job" -> decimal; "job/<id>" -> Job; "step/<id>/<step, 12 digits>" -> StepRecord.
constexpr char kNextJobKey[] = "meta/next_job";

std::string JobKey(const std::string& id) { return absl::StrCat("job/", id); }
std::string StepPrefix(const std::string& id) { return absl::StrCat("step/", id, "/"); }
std::string StepKey(const std::string& id, int64_t step) {
  return absl::StrCat(StepPrefix(id), absl::StrFormat("%012d", step));
}

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<RocksDbJobStore>> RocksDbJobStore::Open(const std::string& path) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.keep_log_file_num = 3;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, path, &raw);
  if (!s.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot open job database ", path, ": ",
                                               s.ToString()));
  }
  return std::unique_ptr<RocksDbJobStore>(
      new RocksDbJobStore(std::unique_ptr<rocksdb::DB>(raw), path));
}

RocksDbJobStore::RocksDbJobStore(std::unique_ptr<rocksdb::DB> db, std::string path)
    : db_(std::move(db)), path_(std::move(path)) {}

RocksDbJobStore::~RocksDbJobStore() = default;

absl::StatusOr<int64_t> RocksDbJobStore::NextJobNumber() {
  absl::MutexLock lock(&mu_);
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kNextJobKey, &value);
  int64_t next = 1;
  if (s.ok()) {
    if (!absl::SimpleAtoi(value, &next)) {
      return absl::DataLossError(absl::StrCat(path_, ": corrupt ", kNextJobKey, " '", value, "'"));
    }
  } else if (!s.IsNotFound()) {
    return FromRocks(s, path_);
  }
  rocksdb::WriteOptions sync;
  sync.sync = true;
  if (auto st = FromRocks(db_->Put(sync, kNextJobKey, absl::StrCat(next + 1)), path_); !st.ok()) {
    return st;
  }
  return next;
}

absl::Status RocksDbJobStore::PutJob(const Job& job) {
  rocksdb::WriteOptions sync;
  sync.sync = true;
  return FromRocks(db_->Put(sync, JobKey(job.id()), job.SerializeAsString()), path_);
}

absl::StatusOr<std::vector<Job>> RocksDbJobStore::ListJobs() {
  std::vector<Job> jobs;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek("job/"); it->Valid() && it->key().starts_with("job/"); it->Next()) {
    Job job;
    if (!job.ParseFromArray(it->value().data(), it->value().size())) {
      return absl::DataLossError(
          absl::StrCat(path_, ": cannot parse the record of ", it->key().ToString()));
    }
    jobs.push_back(std::move(job));
  }
  if (auto st = FromRocks(it->status(), path_); !st.ok()) return st;
  return jobs;
}

absl::Status RocksDbJobStore::PutStep(const Job& job, const StepRecord& step) {
  rocksdb::WriteBatch batch;
  batch.Put(StepKey(job.id(), step.step()), step.SerializeAsString());
  batch.Put(JobKey(job.id()), job.SerializeAsString());
  // Not synced: a crash loses at most the last steps' records, never the job.
  return FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), path_);
}

absl::StatusOr<std::vector<StepRecord>> RocksDbJobStore::Steps(const std::string& job_id) {
  std::vector<StepRecord> steps;
  const std::string prefix = StepPrefix(job_id);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    StepRecord step;
    if (!step.ParseFromArray(it->value().data(), it->value().size())) {
      return absl::DataLossError(
          absl::StrCat(path_, ": cannot parse the record of ", it->key().ToString()));
    }
    steps.push_back(std::move(step));
  }
  if (auto st = FromRocks(it->status(), path_); !st.ok()) return st;
  return steps;
}

absl::Status RocksDbJobStore::DropStepsAfter(const Job& job, int64_t step) {
  rocksdb::WriteBatch batch;
  const std::string prefix = StepPrefix(job.id());
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(StepKey(job.id(), step + 1)); it->Valid() && it->key().starts_with(prefix);
       it->Next()) {
    batch.Delete(it->key());
  }
  RETURN_IF_ERROR(FromRocks(it->status(), path_));
  batch.Put(JobKey(job.id()), job.SerializeAsString());
  return FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), path_);
}

absl::StatusOr<int64_t> MemoryJobStore::NextJobNumber() {
  absl::MutexLock lock(&mu_);
  return next_++;
}

absl::Status MemoryJobStore::PutJob(const Job& job) {
  absl::MutexLock lock(&mu_);
  jobs_[job.id()] = job;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Job>> MemoryJobStore::ListJobs() {
  absl::MutexLock lock(&mu_);
  std::vector<Job> jobs;
  for (const auto& [id, job] : jobs_) jobs.push_back(job);
  return jobs;
}

absl::Status MemoryJobStore::PutStep(const Job& job, const StepRecord& step) {
  absl::MutexLock lock(&mu_);
  jobs_[job.id()] = job;
  steps_[job.id()][step.step()] = step;
  return absl::OkStatus();
}

absl::Status MemoryJobStore::DropStepsAfter(const Job& job, int64_t step) {
  absl::MutexLock lock(&mu_);
  jobs_[job.id()] = job;
  auto& steps = steps_[job.id()];
  steps.erase(steps.upper_bound(step), steps.end());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StepRecord>> MemoryJobStore::Steps(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  std::vector<StepRecord> steps;
  auto it = steps_.find(job_id);
  if (it == steps_.end()) return steps;
  for (const auto& [n, step] : it->second) steps.push_back(step);
  return steps;
}

}  // namespace lumen
