#include "worker/engine/transfers.h"

#include <utility>

namespace lumen::engine {

bool Transfers::Ticket::done() const {
  absl::MutexLock lock(&owner_->mu_);
  return done_;
}

absl::Status Transfers::Ticket::Wait() const {
  absl::MutexLock lock(&owner_->mu_);
  owner_->mu_.Await(absl::Condition(&done_));
  return status_;
}

Transfers::Transfers(TensorHome *device_side, TensorHome *host_side)
    : device_side_(device_side), host_side_(host_side) {
  threads_.emplace_back([this] { ReadLoop(); });
  threads_.emplace_back([this] { WriteLoop(); });
  threads_.emplace_back([this] { HostLoop(); });
}

Transfers::~Transfers() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread &t : threads_) t.join();
}

std::shared_ptr<const Transfers::Ticket> Transfers::Read(const std::string &id, float *data,
                                                         int64_t n) {
  auto ticket = std::shared_ptr<Ticket>(new Ticket(this));
  absl::MutexLock lock(&mu_);
  reads_.push_back({id, data, n, issued_[id], ticket});
  return ticket;
}

void Transfers::Write(const std::string &id, const float *data, int64_t n, HomeTier tier,
                      std::shared_ptr<void> keep_alive) {
  absl::MutexLock lock(&mu_);
  ++issued_[id];
  writes_.push_back({id, data, n, tier, false, std::move(keep_alive)});
}

void Transfers::Free(const std::string &id) {
  absl::MutexLock lock(&mu_);
  ++issued_[id];
  writes_.push_back({id, nullptr, 0, HomeTier::kHost, true, nullptr});
}

void Transfers::HostJob(const std::vector<std::string> &inputs,
                        const std::vector<std::string> &outputs,
                        std::function<absl::Status(TensorHome *host)> job) {
  absl::MutexLock lock(&mu_);
  HostOp op;
  for (const std::string &id : inputs) op.after.emplace_back(id, issued_[id]);
  for (const std::string &id : outputs) {
    ++issued_[id];
    ++host_writing_[id];
  }
  op.outputs = outputs;
  op.job = std::move(job);
  host_ops_.push_back(std::move(op));
}

bool Transfers::WritesDone(const std::string &id, int64_t count) const {
  auto it = finished_.find(id);
  return (it == finished_.end() ? 0 : it->second) >= count;
}

void Transfers::WriteFinished(const std::string &id) { ++finished_[id]; }

void Transfers::Fail(const absl::Status &s) {
  if (!s.ok() && status_.ok()) status_ = s;
}

void Transfers::ReadLoop() {
  absl::MutexLock lock(&mu_);
  while (true) {
    mu_.Await(absl::Condition(
        +[](Transfers *t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          if (t->reads_.empty()) return t->stop_;
          return t->WritesDone(t->reads_.front().id, t->reads_.front().after);
        },
        this));
    // Stopping with every read served. (A read only waits for writes queued before it, and the
    // write and host loops run until their queues are empty, so queued reads always finish.)
    if (reads_.empty()) return;
    ReadOp op = std::move(reads_.front());
    reads_.pop_front();
    ++reads_running_;
    mu_.Unlock();
    absl::Status s = device_side_->Get(op.id, op.data, op.n);
    mu_.Lock();
    --reads_running_;
    op.ticket->status_ = std::move(s);
    op.ticket->done_ = true;
  }
}

void Transfers::WriteLoop() {
  absl::MutexLock lock(&mu_);
  while (true) {
    mu_.Await(absl::Condition(
        +[](Transfers *t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return t->stop_ || !t->writes_.empty();
        },
        this));
    if (writes_.empty()) {
      // Stopping; wait for the other loops, which may still depend on nothing from here.
      return;
    }
    WriteOp op = std::move(writes_.front());
    writes_.pop_front();
    ++writes_running_;
    mu_.Unlock();
    absl::Status s = op.free ? device_side_->Free(op.id)
                             : device_side_->Put(op.id, op.data, op.n, op.tier);
    op.keep_alive.reset();  // releases the device buffer
    mu_.Lock();
    --writes_running_;
    ++writes_completed_;
    WriteFinished(op.id);
    Fail(s);
  }
}

void Transfers::HostLoop() {
  absl::MutexLock lock(&mu_);
  while (true) {
    mu_.Await(absl::Condition(
        +[](Transfers *t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          if (t->host_ops_.empty()) return t->stop_;
          for (const auto &[id, count] : t->host_ops_.front().after) {
            if (!t->WritesDone(id, count)) return false;
          }
          return true;
        },
        this));
    if (host_ops_.empty()) return;
    HostOp op = std::move(host_ops_.front());
    host_ops_.pop_front();
    ++host_running_;
    mu_.Unlock();
    absl::Status s = op.job(host_side_);
    op.job = nullptr;
    mu_.Lock();
    --host_running_;
    for (const std::string &id : op.outputs) {
      WriteFinished(id);
      if (--host_writing_[id] == 0) host_writing_.erase(id);
    }
    Fail(s);
  }
}

int64_t Transfers::writes_completed() const {
  absl::MutexLock lock(&mu_);
  return writes_completed_;
}

bool Transfers::WaitForWrite(int64_t completed) {
  absl::MutexLock lock(&mu_);
  if (writes_completed_ > completed) return true;
  if (writes_.empty() && writes_running_ == 0) return false;
  std::pair<Transfers *, int64_t> arg(this, completed);
  mu_.Await(absl::Condition(
      +[](std::pair<Transfers *, int64_t> *a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return a->first->writes_completed_ > a->second;
      },
      &arg));
  return true;
}

int64_t Transfers::pending_writes() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(writes_.size()) + writes_running_;
}

bool Transfers::HostJobWrites(const std::string &id) const {
  absl::MutexLock lock(&mu_);
  return host_writing_.count(id) > 0;
}

absl::Status Transfers::Drain() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](Transfers *t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return t->reads_.empty() && t->writes_.empty() && t->host_ops_.empty() &&
               t->reads_running_ == 0 && t->writes_running_ == 0 && t->host_running_ == 0;
      },
      this));
  return status_;
}

absl::Status Transfers::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

}  // namespace lumen::engine
