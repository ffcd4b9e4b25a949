#include "worker/memstore_collective.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Counts the bytes each caller moves and the most bytes stored at once.
class CountingMemstore : public FakeMemstoreClient {
 public:
  absl::Status Write(const std::string& id, const void* data, int64_t size,
                     const std::string& dtype, Tier tier) override {
    RETURN_IF_ERROR(FakeMemstoreClient::Write(id, data, size, dtype, tier));
    absl::MutexLock lock(&mu_);
    written_ += size;
    stored_[id] = size;
    int64_t total = 0;
    for (const auto& [name, bytes] : stored_) total += bytes;
    peak_ = std::max(peak_, total);
    return absl::OkStatus();
  }
  absl::StatusOr<int64_t> Read(const std::string& id, void* dst, int64_t capacity) override {
    absl::StatusOr<int64_t> got = FakeMemstoreClient::Read(id, dst, capacity);
    if (got.ok()) {
      absl::MutexLock lock(&mu_);
      read_ += *got;
    }
    return got;
  }
  absl::Status Free(const std::string& id) override {
    {
      absl::MutexLock lock(&mu_);
      stored_.erase(id);
    }
    return FakeMemstoreClient::Free(id);
  }
  int64_t read() {
    absl::MutexLock lock(&mu_);
    return read_;
  }
  int64_t written() {
    absl::MutexLock lock(&mu_);
    return written_;
  }
  int64_t peak() {
    absl::MutexLock lock(&mu_);
    return peak_;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, int64_t> stored_ ABSL_GUARDED_BY(mu_);
  int64_t read_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t written_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t peak_ ABSL_GUARDED_BY(mu_) = 0;
};

// Three replicas in threads sum through one memstore: each gets the rank-order sum, the same
// bits; only the last step's sums are left behind.
TEST(MemstoreCollectiveTest, ReplicasGetTheSameRankOrderSums) {
  FakeMemstoreClient memstore;
  constexpr int kReplicas = 3;
  std::vector<std::vector<float>> got(kReplicas);
  std::vector<std::vector<double>> got_scalars(kReplicas);
  std::vector<absl::Status> status(kReplicas);
  std::vector<std::thread> threads;
  for (int r = 0; r < kReplicas; ++r) {
    threads.emplace_back([&, r] {
      MemstoreCollective c(&memstore, "job-000001", 0, r, kReplicas, [] { return false; });
      for (int64_t step = 0; step < 3 && status[r].ok(); ++step) {
        // Four values: shards of 2, 1 and 1.
        std::vector<float> values = {0.1f * (r + 1), 1e8f * (r == 1 ? 1 : 0), 1.0f + step,
                                     -0.5f * r};
        std::vector<double> scalars = {0.5 * r};
        status[r] = c.SumAcrossReplicas(step, absl::MakeSpan(values), &scalars);
        got[r] = values;
        got_scalars[r] = scalars;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kReplicas; ++r) ASSERT_TRUE(status[r].ok()) << r << ": " << status[r];
  // Rank order: ((0.1 + 0.2) + 0.3), (0 + 1e8) + 0, three times 3, (0 - 0.5) - 1.
  const float first = (0.1f + 0.2f) + 0.3f;
  for (int r = 0; r < kReplicas; ++r) {
    EXPECT_EQ(got[r], (std::vector<float>{first, 1e8f, 9.0f, -1.5f})) << "replica " << r;
    EXPECT_EQ(got_scalars[r], (std::vector<double>{1.5})) << "replica " << r;
  }
  // The last step's sums remain (the coordinator frees them with the job); its parts and the
  // earlier steps' tensors are gone.
  const std::string prefix = MemstoreCollective::Prefix("job-000001", 0);
  char buf[64];
  for (int k = 0; k < kReplicas; ++k) {
    EXPECT_TRUE(memstore.Read(absl::StrCat(prefix, "2/sum/", k), buf, sizeof(buf)).ok()) << k;
    EXPECT_TRUE(absl::IsNotFound(
        memstore.Read(absl::StrCat(prefix, "1/sum/", k), buf, sizeof(buf)).status()));
    for (int r = 0; r < kReplicas; ++r) {
      EXPECT_TRUE(absl::IsNotFound(
          memstore.Read(absl::StrCat(prefix, "2/", r, "/", k), buf, sizeof(buf)).status()));
    }
  }
}

// A reduce-scatter: with 4 replicas each reads and writes about twice its values' bytes a
// step (an all-to-all exchange would read 3 times), and the memstore never holds more than
// the replicas' claims.
TEST(MemstoreCollectiveTest, EachReplicaMovesAboutTwiceItsValues) {
  CountingMemstore memstore;
  constexpr int kReplicas = 4;
  constexpr int64_t kValues = 100003;  // not a multiple of 4
  constexpr int kSteps = 3;
  std::vector<absl::Status> status(kReplicas);
  std::vector<std::vector<float>> got(kReplicas);
  std::vector<std::thread> threads;
  for (int r = 0; r < kReplicas; ++r) {
    threads.emplace_back([&, r] {
      MemstoreCollective c(&memstore, "job-000005", 0, r, kReplicas, [] { return false; });
      for (int64_t step = 0; step < kSteps && status[r].ok(); ++step) {
        std::vector<float> values(kValues);
        for (int64_t i = 0; i < kValues; ++i) values[i] = static_cast<float>(r * 7 + i % 13);
        std::vector<double> scalars = {1.0};
        status[r] = c.SumAcrossReplicas(step, absl::MakeSpan(values), &scalars);
        got[r] = std::move(values);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kReplicas; ++r) ASSERT_TRUE(status[r].ok()) << r << ": " << status[r];
  for (int r = 0; r < kReplicas; ++r) {
    ASSERT_EQ(got[r].size(), kValues);
    for (int64_t i = 0; i < kValues; i += 997) {
      ASSERT_EQ(got[r][i], static_cast<float>(42 + 4 * (i % 13))) << "replica " << r << " @" << i;
    }
  }
  const double value_bytes = 4.0 * kValues;
  const double per_replica_step_read = memstore.read() / (1.0 * kReplicas * kSteps);
  const double per_replica_step_written = memstore.written() / (1.0 * kReplicas * kSteps);
  // (N - 1) / N of the values as parts, the same again as sums: 1.5 times for 4 replicas.
  EXPECT_NEAR(per_replica_step_read / value_bytes, 1.5, 0.01);
  EXPECT_NEAR(per_replica_step_written / value_bytes, 1.0, 0.01);
  EXPECT_LE(memstore.peak(), kReplicas * MemstoreCollective::ClaimBytes(kValues, 1, kReplicas));
}

// A replica whose peer never comes stops when its task is cancelled, or after the timeout,
// naming the peer and the step.
TEST(MemstoreCollectiveTest, AMissingPeerEndsTheWaitByCancelOrTimeout) {
  FakeMemstoreClient memstore;
  std::atomic<bool> cancel{false};
  MemstoreCollective waiting(&memstore, "job-000002", 0, 0, 2, [&] { return cancel.load(); });
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(100));
    cancel = true;
  });
  std::vector<float> values = {1.0f};
  std::vector<double> scalars;
  absl::Status s = waiting.SumAcrossReplicas(4, absl::MakeSpan(values), &scalars);
  canceller.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("replica 1's gradients of step 4"));

  // The coordinator freeing the exchange (the run ended) ends the wait within 2 s.
  MemstoreCollective abandoned(&memstore, "job-000004", 0, 0, 2, [] { return false; });
  std::thread reclaim([&] {
    absl::SleepFor(absl::Milliseconds(100));
    ASSERT_TRUE(memstore.FreeTensors(JobReplicaPrefix("job-000004"), absl::Seconds(1))
                    .ok());
  });
  const absl::Time start = absl::Now();
  s = abandoned.SumAcrossReplicas(7, absl::MakeSpan(values), &scalars);
  reclaim.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("the exchange was freed"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));

  MemstoreCollective timed(&memstore, "job-000003", 0, 1, 2, [] { return false; },
                           absl::Milliseconds(50));
  s = timed.SumAcrossReplicas(0, absl::MakeSpan(values), &scalars);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("replica 0's gradients of job-000003 for step 0 did not come within"));
}

// A replica of a stopped run may write a step's part and sum after the coordinator reclaimed
// the run's exchange. The next run, resumed from a checkpoint, reaches that step again: its
// replicas must not take those tensors for their peers'. (Taken, replica 1 would read the
// stale sum at once and free its own part before replica 0, later to the step, read it; both
// then waited for good.) Here the stale tensors hold garbage, and replica 0 comes late.
TEST(MemstoreCollectiveTest, ARunIgnoresWhatAStoppedRunWroteLate) {
  FakeMemstoreClient memstore;
  constexpr int64_t kStep = 13;
  {
    // Run 0's replica 0 wrote its part for replica 1 and its sum of step 13, then stopped.
    const std::string run0 = MemstoreCollective::Prefix("job-000006", 0);
    const std::vector<char> garbage(64, 0x7f);
    for (const std::string& id : {absl::StrCat(run0, kStep, "/0/1"),
                                  absl::StrCat(run0, kStep, "/sum/0")}) {
      ASSERT_TRUE(memstore.Write(id, garbage.data(), 2 * sizeof(float) + sizeof(double) + 8,
                                 "uint8", TIER_HOST).ok());
    }
  }
  std::vector<std::vector<float>> got(2);
  std::vector<absl::Status> status(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      if (r == 0) absl::SleepFor(absl::Milliseconds(200));
      MemstoreCollective c(&memstore, "job-000006", 1, r, 2, [] { return false; },
                           absl::Seconds(10));
      std::vector<float> values = {1.0f + r, 10.0f + r, 100.0f + r, 1000.0f + r};
      std::vector<double> scalars = {0.5};
      status[r] = c.SumAcrossReplicas(kStep, absl::MakeSpan(values), &scalars);
      got[r] = values;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(status[r].ok()) << "replica " << r << ": " << status[r];
    EXPECT_EQ(got[r], (std::vector<float>{3.0f, 21.0f, 201.0f, 2001.0f})) << "replica " << r;
  }
}

}  // namespace
}  // namespace lumen
