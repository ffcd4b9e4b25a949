// ThreadPool::ParallelFor: coverage of every index, the deterministic split, and both the
// polling and the blocking hand-over between back-to-back loops.
#include "worker/engine/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace lumen::engine {
namespace {

TEST(ThreadPoolTest, CoversEveryIndexOnce) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 5, 64, 1001}) {
      for (int64_t grain : {1, 16, 2000}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelFor(n, grain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(hits[i].load(), 1) << threads << " threads, n " << n << " grain " << grain;
        }
      }
    }
  }
}

TEST(ThreadPoolTest, SplitDependsOnlyOnSizes) {
  ThreadPool pool(3);
  auto chunks = [&pool] {
    std::mutex mu;
    std::vector<std::pair<int64_t, int64_t>> out;
    pool.ParallelFor(100, 1, [&](int64_t b, int64_t e) {
      std::lock_guard<std::mutex> lock(mu);
      out.emplace_back(b, e);
    });
    std::sort(out.begin(), out.end());
    return out;
  };
  const std::vector<std::pair<int64_t, int64_t>> want = {{0, 34}, {34, 67}, {67, 100}};
  EXPECT_EQ(chunks(), want);
  EXPECT_EQ(chunks(), want);
}

// Thousands of back-to-back loops (workers still polling) and loops after the workers have
// gone to sleep on the condition variable both complete with every chunk run.
TEST(ThreadPoolTest, BackToBackAndAfterIdle) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  for (int i = 0; i < 20000; ++i) {
    pool.ParallelFor(2, 1, [&](int64_t b, int64_t e) { total += e - b; });
  }
  EXPECT_EQ(total.load(), 40000);
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    pool.ParallelFor(2, 1, [&](int64_t b, int64_t e) { total += e - b; });
  }
  EXPECT_EQ(total.load(), 40006);
}

}  // namespace
}  // namespace lumen::engine
