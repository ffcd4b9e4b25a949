#include "worker/engine/transfers.h"

#include <atomic>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/tensor_home.h"

namespace lumen::engine {
namespace {

// 4 MB/s: a 64 KiB transfer takes about 16 ms, long enough for a racing read to overtake it
// if ordering were not enforced.
constexpr double kSlowLink = 4e6;
constexpr int64_t kN = 16384;

TEST(TransfersTest, ReadSeesEveryWriteIssuedBeforeIt) {
  MemoryTensorHome memory;
  ThrottledTensorHome link(&memory, kSlowLink);
  Transfers transfers(&link, &memory);
  for (int round = 1; round <= 3; ++round) {
    auto data = std::make_shared<std::vector<float>>(kN, static_cast<float>(round));
    transfers.Write("t", data->data(), kN, HomeTier::kHost, data);
    std::vector<float> out(kN, -1.0f);
    auto ticket = transfers.Read("t", out.data(), kN);
    ASSERT_TRUE(ticket->Wait().ok());
    EXPECT_TRUE(ticket->done());
    EXPECT_EQ(out.front(), round);
    EXPECT_EQ(out.back(), round);
  }
  EXPECT_TRUE(transfers.Drain().ok());
}

TEST(TransfersTest, WriteReleasesItsBufferWhenDone) {
  MemoryTensorHome memory;
  ThrottledTensorHome link(&memory, kSlowLink);
  Transfers transfers(&link, &memory);
  auto data = std::make_shared<std::vector<float>>(kN, 1.0f);
  std::weak_ptr<std::vector<float>> watch = data;
  const int64_t before = transfers.writes_completed();
  const float* raw = data->data();
  transfers.Write("t", raw, kN, HomeTier::kNvme, std::move(data));
  EXPECT_EQ(transfers.pending_writes(), 1);
  EXPECT_TRUE(transfers.WaitForWrite(before));
  EXPECT_TRUE(watch.expired());
  EXPECT_EQ(transfers.pending_writes(), 0);
  EXPECT_FALSE(transfers.WaitForWrite(transfers.writes_completed()));
  HomeTier tier;
  ASSERT_TRUE(memory.TierOf("t", &tier).ok());
  EXPECT_EQ(tier, HomeTier::kNvme);
}

TEST(TransfersTest, HostJobRunsAfterItsInputsAndBeforeReadsOfItsOutputs) {
  MemoryTensorHome memory;
  ThrottledTensorHome link(&memory, kSlowLink);
  Transfers transfers(&link, &memory);
  std::vector<float> zeros(kN, 0.0f);
  ASSERT_TRUE(memory.Put("out", zeros.data(), kN, HomeTier::kHost).ok());
  auto grad = std::make_shared<std::vector<float>>(kN, 2.0f);
  transfers.Write("in", grad->data(), kN, HomeTier::kHost, grad);
  std::atomic<bool> ran{false};
  transfers.HostJob({"in"}, {"out"}, [&](TensorHome* host) {
    std::vector<float> v(kN);
    if (absl::Status s = host->Get("in", v.data(), kN); !s.ok()) return s;
    for (float& x : v) x *= 3;
    ran = true;
    return host->Put("out", v.data(), kN, HomeTier::kHost);
  });
  EXPECT_TRUE(transfers.HostJobWrites("out"));
  std::vector<float> out(kN);
  ASSERT_TRUE(transfers.Read("out", out.data(), kN)->Wait().ok());
  EXPECT_TRUE(ran);
  EXPECT_EQ(out[0], 6.0f);
  EXPECT_EQ(out[kN - 1], 6.0f);
  EXPECT_FALSE(transfers.HostJobWrites("out"));
}

TEST(TransfersTest, ErrorsReachTicketsAndDrain) {
  MemoryTensorHome memory;
  Transfers transfers(&memory, &memory);
  std::vector<float> out(4);
  EXPECT_EQ(transfers.Read("missing", out.data(), 4)->Wait().code(), absl::StatusCode::kNotFound);
  transfers.Free("also-missing");
  const absl::Status s = transfers.Drain();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("also-missing"), std::string::npos);
  EXPECT_EQ(transfers.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lumen::engine
