// A server-streaming reactor fed from other threads: producers push messages through an Outlet,
// the reactor writes them one at a time in order and finishes after the last. Producers may
// keep the Outlet after the call ended; pushes then do nothing. Thread-safe.
#ifndef LUMEN_COMMON_STREAM_REACTOR_H_
#define LUMEN_COMMON_STREAM_REACTOR_H_

#include <deque>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/server_callback.h"

namespace lumen {

template <typename T>
class StreamReactor : public grpc::ServerWriteReactor<T> {
 public:
  class Outlet {
   public:
    // Queues `message` for the client.
    void Push(T message) {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->Enqueue(std::move(message));
    }
    // Ends the call with `status` once the queued messages are written.
    void Close(const grpc::Status& status) {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->CloseAfterQueue(status);
    }
    // True once the client cancelled or went away (or the call ended).
    bool cancelled() const {
      absl::MutexLock lock(&mu_);
      return reactor_ == nullptr || reactor_->cancelled_;
    }

   private:
    friend class StreamReactor;
    mutable absl::Mutex mu_;
    StreamReactor* reactor_ ABSL_GUARDED_BY(mu_) = nullptr;
  };

  StreamReactor() : outlet_(std::make_shared<Outlet>()) {
    absl::MutexLock lock(&outlet_->mu_);
    outlet_->reactor_ = this;
  }

  const std::shared_ptr<Outlet>& outlet() const { return outlet_; }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      cancelled_ = true;
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    WriteNext();
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    }
    OnClientCancelled();
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&outlet_->mu_);
      outlet_->reactor_ = nullptr;
    }
    OnStreamDone();
    delete this;
  }

 protected:
  ~StreamReactor() override = default;
  // Called (without locks) when the client cancels; producers should stop.
  virtual void OnClientCancelled() {}
  // Called once after the call ended, before the reactor is deleted.
  virtual void OnStreamDone() {}

 private:
  void Enqueue(T message) {
    absl::MutexLock lock(&mu_);
    if (finished_ || closing_) return;
    pending_.push_back(std::move(message));
    if (!writing_) WriteNext();
  }

  void CloseAfterQueue(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    if (closing_) return;
    closing_ = true;
    close_status_ = status;
    if (!writing_) WriteNext();
  }

  void WriteNext() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    if (pending_.empty()) {
      if (closing_) FinishOnce(close_status_);
      return;
    }
    current_ = std::move(pending_.front());
    pending_.pop_front();
    writing_ = true;
    this->StartWrite(&current_);
  }

  void FinishOnce(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    this->Finish(status);
  }

  const std::shared_ptr<Outlet> outlet_;
  absl::Mutex mu_;
  std::deque<T> pending_ ABSL_GUARDED_BY(mu_);
  T current_ ABSL_GUARDED_BY(mu_);
  grpc::Status close_status_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace lumen

#endif  // LUMEN_COMMON_STREAM_REACTOR_H_
