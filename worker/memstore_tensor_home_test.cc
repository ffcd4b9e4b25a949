#include "worker/memstore_tensor_home.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/offload_trainer.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Counts FreeTensors calls.
class CountingMemstore : public FakeMemstoreClient {
 public:
  absl::StatusOr<FreeTensorsReply> FreeTensors(const std::string& prefix,
                                               absl::Duration timeout) override {
    ++free_calls;
    return FakeMemstoreClient::FreeTensors(prefix, timeout);
  }
  int free_calls = 0;
};

TEST(MemstoreTensorHomeTest, FreeAllFreesThePrefixAndAsksNothingWhenNothingWasPut) {
  CountingMemstore client;
  ASSERT_TRUE(client.Write("job-2/x", "abcd", 4, "float32", TIER_HOST).ok());
  {
    // A job that stayed on the device: no call (the memstore may already be gone at stop).
    MemstoreTensorHome idle(&client, "job-1/");
    EXPECT_TRUE(idle.FreeAll().ok());
    EXPECT_EQ(client.free_calls, 0);
  }
  MemstoreTensorHome home(&client, "job-1/");
  const std::vector<float> x = {1.0f, 2.0f};
  ASSERT_TRUE(home.Put("a", x.data(), 2, engine::HomeTier::kHost).ok());
  ASSERT_TRUE(home.Put("b", x.data(), 2, engine::HomeTier::kHost).ok());
  EXPECT_TRUE(home.FreeAll().ok());
  EXPECT_EQ(client.free_calls, 1);
  std::vector<float> y(2);
  EXPECT_EQ(home.Get("a", y.data(), 2).code(), absl::StatusCode::kNotFound);
  char other[4];
  EXPECT_TRUE(client.Read("job-2/x", other, 4).ok());  // another job's tensor stays
}

TEST(MemstoreTensorHomeTest, RoundTripsThroughTheMemstore) {
  FakeMemstoreClient client;
  MemstoreTensorHome home(&client, "job-1/");
  const std::vector<float> x = {1.5f, -2.0f, 3.25f};
  ASSERT_TRUE(home.Put("param/a", x.data(), 3, engine::HomeTier::kNvme).ok());
  std::vector<float> y(3);
  ASSERT_TRUE(home.Get("param/a", y.data(), 3).ok());
  EXPECT_EQ(x, y);
  // Stored under the prefix, as float32 bytes.
  std::vector<float> raw(3);
  auto n = client.Read("job-1/param/a", raw.data(), 12);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 12);
  std::vector<float> big(4);
  absl::Status s = home.Get("param/a", big.data(), 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("holds 12 bytes; expected 16"));
  ASSERT_TRUE(home.Free("param/a").ok());
  EXPECT_EQ(home.Get("param/a", y.data(), 3).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(MemstoreTensorHome::ToTier(engine::HomeTier::kNvme), TIER_NVME);
  EXPECT_EQ(MemstoreTensorHome::ToTier(engine::HomeTier::kHost), TIER_HOST);
}

TEST(MemstoreTensorHomeTest, OffloadTrainerStepsThroughIt) {
  const std::string path =
      std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") + "/t.bin";
  std::vector<uint16_t> toks(3000);
  std::mt19937 rng(3);
  for (uint16_t& t : toks) t = static_cast<uint16_t>(rng() % 64);
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(toks.data(), 2, toks.size(), f);
  std::fclose(f);
  engine::TrainerOptions o;
  o.model.hidden_size = 32;
  o.model.intermediate_size = 64;
  o.model.num_hidden_layers = 4;
  o.model.num_attention_heads = 4;
  o.model.num_key_value_heads = 2;
  o.model.vocab_size = 64;
  o.model.max_position_embeddings = 16;
  o.train.seq_len = 8;
  o.train.micro_batch_size = 2;
  o.train.grad_accum_steps = 2;
  o.train.steps = 2;
  o.data.path = path;
  FakeMemstoreClient client;
  MemstoreTensorHome home(&client, "job-2/");
  engine::OffloadOptions off;
  off.home = &home;
  off.optimizer_state_tier = engine::HomeTier::kNvme;
  off.device_budget_bytes = 160 << 10;
  auto t = engine::OffloadTrainer::Create(o, off);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_FALSE((*t)->resident());
  engine::OffloadOptions all;
  auto r = engine::OffloadTrainer::Create(o, all);
  ASSERT_TRUE(r.ok()) << r.status();
  for (int s = 0; s < 2; ++s) {
    auto a = (*t)->Step();
    auto b = (*r)->Step();
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->loss, b->loss);
    EXPECT_LE(a->device_memory_peak_bytes, off.device_budget_bytes);
    EXPECT_GT(a->bytes_moved(), 0);
  }
}

}  // namespace
}  // namespace lumen
