// Asynchronous movement of tensors between the device and their home, so that transfers
// overlap compute (DESIGN.md §2): one thread reads home -> device (prefetches), one writes
// device -> home (write-behind, frees), and one runs host-side jobs on the home directly (the
// optimizer near the data). Ordering per tensor id: a read waits for every write of that id
// issued before it (by the write thread or a host job), so it sees the latest data; a host
// job waits for the writes of its inputs. Thread-safe.
#ifndef LUMEN_WORKER_ENGINE_TRANSFERS_H_
#define LUMEN_WORKER_ENGINE_TRANSFERS_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "worker/engine/tensor_home.h"

namespace lumen::engine {

class Transfers {
 public:
  // A read in flight.
  class Ticket {
   public:
    // True once the read finished (successfully or not).
    bool done() const;
    // Blocks until the read finished; its status.
    absl::Status Wait() const;

   private:
    friend class Transfers;
    explicit Ticket(Transfers *owner) : owner_(owner) {}
    Transfers *owner_;
    bool done_ = false;  // guarded by owner_->mu_
    absl::Status status_;
  };

  // `device_side`: the home as the device sees it (through the link model, if any).
  // `host_side`: the same tensors as the host CPU sees them (no link); host jobs use it.
  // Neither is owned; both must outlive this.
  Transfers(TensorHome *device_side, TensorHome *host_side);
  // Finishes all queued work, then stops the threads.
  ~Transfers();
  Transfers(const Transfers &) = delete;
  Transfers &operator=(const Transfers &) = delete;

  // Reads tensor `id` (n floats) into `data`, which must stay valid and untouched until the
  // ticket is done.
  std::shared_ptr<const Ticket> Read(const std::string &id, float *data, int64_t n);
  // Writes n floats at `data` home as `id` in `tier`. `keep_alive` owns the memory and is
  // dropped once the write finished (that is when a device buffer's memory is released).
  void Write(const std::string &id, const float *data, int64_t n, HomeTier tier,
             std::shared_ptr<void> keep_alive);
  // Deletes `id` from the home, after every write queued before.
  void Free(const std::string &id);
  // Runs `job` on the host-job thread once every write of each of `inputs` issued so far has
  // finished. Reads of any of `outputs` issued after this call wait for the job.
  void HostJob(const std::vector<std::string> &inputs, const std::vector<std::string> &outputs,
               std::function<absl::Status(TensorHome *host)> job);

  // Writes and frees finished since construction.
  int64_t writes_completed() const;
  // True at once when more than `completed` writes have finished; else blocks until one
  // more finishes, or returns false at once when none is queued or running.
  bool WaitForWrite(int64_t completed);
  // Writes and frees queued or running.
  int64_t pending_writes() const;
  // True while a host job that writes `id` is queued or running.
  bool HostJobWrites(const std::string &id) const;
  // Blocks until every queued read, write and host job finished; the first error any of them
  // returned since construction (reads' errors are also returned by their tickets).
  absl::Status Drain();
  // The first error of a write, free or host job so far.
  absl::Status status() const;

 private:
  struct ReadOp {
    std::string id;
    float *data;
    int64_t n;
    int64_t after;  // writes of id that must finish first
    std::shared_ptr<Ticket> ticket;
  };
  struct WriteOp {
    std::string id;
    const float *data;
    int64_t n;
    HomeTier tier;
    bool free;
    std::shared_ptr<void> keep_alive;
  };
  struct HostOp {
    std::vector<std::pair<std::string, int64_t>> after;  // (id, writes that must finish)
    std::vector<std::string> outputs;
    std::function<absl::Status(TensorHome *)> job;
  };

  void ReadLoop();
  void WriteLoop();
  void HostLoop();
  bool WritesDone(const std::string &id, int64_t count) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WriteFinished(const std::string &id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Fail(const absl::Status &s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  TensorHome *const device_side_;
  TensorHome *const host_side_;
  mutable absl::Mutex mu_;
  std::deque<ReadOp> reads_ ABSL_GUARDED_BY(mu_);
  std::deque<WriteOp> writes_ ABSL_GUARDED_BY(mu_);
  std::deque<HostOp> host_ops_ ABSL_GUARDED_BY(mu_);
  // Per id: writes issued and finished (device writes and host-job outputs).
  std::map<std::string, int64_t> issued_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> finished_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> host_writing_ ABSL_GUARDED_BY(mu_);
  int64_t writes_running_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t writes_completed_ ABSL_GUARDED_BY(mu_) = 0;
  int reads_running_ ABSL_GUARDED_BY(mu_) = 0;
  int host_running_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_TRANSFERS_H_
