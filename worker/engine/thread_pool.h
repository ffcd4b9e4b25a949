// A small fixed-size thread pool for data-parallel loops over rows.
// Thread-safety: ParallelFor may be called by one thread at a time (it is not reentrant and
// concurrent callers must synchronise externally); construction and destruction are not
// concurrent with ParallelFor.
#ifndef LUMEN_WORKER_ENGINE_THREAD_POOL_H_
#define LUMEN_WORKER_ENGINE_THREAD_POOL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lumen::engine {

class ThreadPool {
 public:
  // Starts num_threads - 1 workers; the thread calling ParallelFor does the first chunk.
  // num_threads < 1 is treated as 1 (no workers, everything runs inline).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Splits [0, n) into at most num_threads contiguous chunks of at least `grain` items and
  // calls fn(begin, end) once per chunk, concurrently; returns when all chunks are done.
  // The split depends only on n, grain and num_threads, so a loop whose iterations write
  // disjoint outputs is deterministic.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);

  // Waiting threads poll for this long before blocking on a condition variable: a training step
  // runs hundreds of short loops back to back, and a futex wake-up per loop cost tens of
  // microseconds. Bounded so that an idle pool does not hold a core.
  static constexpr std::chrono::microseconds kSpin{50};

  const int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  // Written by ParallelFor under mu_ before generation_ is bumped (release); read by workers
  // after they observe the new generation_ (acquire).
  int active_chunks_ = 0;
  int64_t n_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  // Changed under mu_ (so blocked waiters cannot miss a notify); polled without it.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_THREAD_POOL_H_
