// Data parallelism: replicas of one job, each training its share of a step's micro-batches,
// sum their gradients (and losses) before the norm and AdamW, so every replica applies the
// same update and their weights stay equal. `Collective` is how a replica reaches the others:
// through the memstore between worker processes (worker/memstore_collective.h), or in one
// process for tests (LocalCollectives).
#ifndef LUMEN_WORKER_ENGINE_COLLECTIVE_H_
#define LUMEN_WORKER_ENGINE_COLLECTIVE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace lumen::engine {

class Collective {
 public:
  virtual ~Collective() = default;
  // This replica's index in [0, size()).
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Replaces `values` and `scalars` (the same lengths on every replica) by their element-wise
  // sums over the replicas (in place: `values` may be pinned memory the caller copies with),
  // added in rank order so every replica gets the same bits; returns only when every replica
  // has called it. Every replica makes the same calls in the same order, each numbered higher
  // than the one before (a step's number, or several numbers a step). Errors name the replica
  // that did not take part (a peer that died, a cancelled task).
  virtual absl::Status SumAcrossReplicas(int64_t step, absl::Span<float> values,
                                         std::vector<double>* scalars) = 0;
};

// What makes a trainer one replica of a job on several workers (engine::OffloadTrainer,
// cuda::CudaJobTrainer): it trains micro-batches [micro_batch_offset, micro_batch_offset + its
// own count) of each step's `global_micro_batches` (MicroBatchShareOf), scaled as a part of all
// of them, and sums its gradients and loss with the other replicas through `collective` before
// the norm, so every replica applies the same update; step results report the whole step.
struct ReplicaOptions {
  Collective* collective = nullptr;  // not owned; null: the only replica
  int64_t micro_batch_offset = 0;
  int64_t global_micro_batches = 0;  // 0: the trainer's own micro-batches
};

// The micro-batches [first, first + count) of a step's `total` that replica `rank` of `size`
// trains: contiguous, as even as they divide (the first `total % size` replicas get one more).
struct MicroBatchShare {
  int64_t first = 0;
  int64_t count = 0;
};
MicroBatchShare MicroBatchShareOf(int64_t total, int rank, int size);

// `size` replicas in one process (threads), for tests. Thread-safe.
class LocalCollectives {
 public:
  explicit LocalCollectives(int size);
  ~LocalCollectives();
  // Replica `rank`'s end; owned by this object.
  Collective* Member(int rank);

 private:
  class Replica;
  absl::Status Sum(int rank, absl::Span<float> values, std::vector<double>* scalars);

  const int size_;
  std::vector<std::unique_ptr<Replica>> members_;
  absl::Mutex mu_;
  std::vector<std::vector<float>> values_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<double>> scalars_ ABSL_GUARDED_BY(mu_);
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int departed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_COLLECTIVE_H_
