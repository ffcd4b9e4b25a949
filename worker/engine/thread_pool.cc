#include "worker/engine/thread_pool.h"

#include <algorithm>

namespace lumen::engine {

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_relaxed);
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

namespace {
inline void ChunkBounds(int64_t n, int chunks, int index, int64_t* begin, int64_t* end) {
  const int64_t base = n / chunks;
  const int64_t rem = n % chunks;
  *begin = index * base + std::min<int64_t>(index, rem);
  *end = *begin + base + (index < rem ? 1 : 0);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls done() for up to `limit`; returns its last value.
template <typename Done>
bool SpinUntil(const Done& done, std::chrono::microseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (true) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}
}  // namespace

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int chunks =
      static_cast<int>(std::min<int64_t>(num_threads_, (n + grain - 1) / grain));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    n_ = n;
    fn_ = &fn;
    active_chunks_ = chunks;
    pending_.store(chunks - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.notify_all();
  int64_t begin, end;
  ChunkBounds(n, chunks, 0, &begin, &end);
  fn(begin, end);
  auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(done, kSpin)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, done);
  }
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  auto has_work = [&] {
    return stop_.load(std::memory_order_relaxed) ||
           generation_.load(std::memory_order_acquire) != seen;
  };
  while (true) {
    if (!SpinUntil(has_work, kSpin)) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, has_work);
    }
    if (stop_.load(std::memory_order_relaxed)) return;
    int64_t n;
    int chunks;
    const std::function<void(int64_t, int64_t)>* fn;
    {
      // Taking mu_ orders these reads after ParallelFor's writes even when the new generation
      // was seen by polling.
      std::lock_guard<std::mutex> lock(mu_);
      seen = generation_.load(std::memory_order_relaxed);
      n = n_;
      chunks = active_chunks_;
      fn = fn_;
    }
    if (index < chunks) {
      int64_t begin, end;
      ChunkBounds(n, chunks, index, &begin, &end);
      (*fn)(begin, end);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_cv_.notify_one();
      }
    }
  }
}

}  // namespace lumen::engine
