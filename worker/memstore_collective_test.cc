#include "worker/memstore_collective.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Three replicas in threads sum through one memstore: each gets the rank-order sum, the same
// bits; a replica's tensor of a step is freed once every replica has written the next.
TEST(MemstoreCollectiveTest, ReplicasGetTheSameRankOrderSums) {
  FakeMemstoreClient memstore;
  constexpr int kReplicas = 3;
  std::vector<std::vector<float>> got(kReplicas);
  std::vector<std::vector<double>> got_scalars(kReplicas);
  std::vector<absl::Status> status(kReplicas);
  std::vector<std::thread> threads;
  for (int r = 0; r < kReplicas; ++r) {
    threads.emplace_back([&, r] {
      MemstoreCollective c(&memstore, "job-000001", r, kReplicas, [] { return false; });
      for (int64_t step = 0; step < 3 && status[r].ok(); ++step) {
        std::vector<float> values = {0.1f * (r + 1), 1e8f * (r == 1 ? 1 : 0), 1.0f + step};
        std::vector<double> scalars = {0.5 * r};
        status[r] = c.SumAcrossReplicas(step, &values, &scalars);
        got[r] = values;
        got_scalars[r] = scalars;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kReplicas; ++r) ASSERT_TRUE(status[r].ok()) << r << ": " << status[r];
  // Rank order: ((0.1 + 0.2) + 0.3), (0 + 1e8) + 0, three times 3.
  const float first = (0.1f + 0.2f) + 0.3f;
  for (int r = 0; r < kReplicas; ++r) {
    EXPECT_EQ(got[r], (std::vector<float>{first, 1e8f, 9.0f})) << "replica " << r;
    EXPECT_EQ(got_scalars[r], (std::vector<double>{1.5})) << "replica " << r;
  }
  // The last step's tensors remain (the coordinator frees them with the job); the earlier
  // steps' are gone.
  for (int r = 0; r < kReplicas; ++r) {
    float buf[8];
    EXPECT_TRUE(memstore.Read(absl::StrCat(MemstoreCollective::Prefix("job-000001"), "2/", r),
                              buf, sizeof(buf)).ok());
    EXPECT_TRUE(absl::IsNotFound(
        memstore.Read(absl::StrCat(MemstoreCollective::Prefix("job-000001"), "1/", r), buf,
                      sizeof(buf)).status()));
  }
}

// A replica whose peer never comes stops when its task is cancelled, or after the timeout,
// naming the peer and the step.
TEST(MemstoreCollectiveTest, AMissingPeerEndsTheWaitByCancelOrTimeout) {
  FakeMemstoreClient memstore;
  std::atomic<bool> cancel{false};
  MemstoreCollective waiting(&memstore, "job-000002", 0, 2, [&] { return cancel.load(); });
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(100));
    cancel = true;
  });
  std::vector<float> values = {1.0f};
  std::vector<double> scalars;
  absl::Status s = waiting.SumAcrossReplicas(4, &values, &scalars);
  canceller.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("replica 1's step 4"));

  // The coordinator freeing the exchange (the run ended) ends the wait within 2 s.
  MemstoreCollective abandoned(&memstore, "job-000004", 0, 2, [] { return false; });
  std::thread reclaim([&] {
    absl::SleepFor(absl::Milliseconds(100));
    ASSERT_TRUE(memstore.FreeTensors(MemstoreCollective::Prefix("job-000004"), absl::Seconds(1))
                    .ok());
  });
  const absl::Time start = absl::Now();
  s = abandoned.SumAcrossReplicas(7, &values, &scalars);
  reclaim.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("the exchange was freed"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));

  MemstoreCollective timed(&memstore, "job-000003", 1, 2, [] { return false; },
                           absl::Milliseconds(50));
  s = timed.SumAcrossReplicas(0, &values, &scalars);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("replica 0 of job-000003 did not send its step 0 gradients"));
}

}  // namespace
}  // namespace lumen
