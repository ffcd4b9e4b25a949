#include "worker/engine/generate.h"

#include <cmath>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

ModelConfig Config() {
  ModelConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 50;
  c.max_position_embeddings = 40;
  c.init_std = 0.5;  // peaky distributions so greedy choices are well separated
  return c;
}

TEST(GenerateTest, GreedyMatchesFullRecomputation) {
  const ModelConfig c = Config();
  LlamaModel model(c, false, nullptr);
  InitParams(c, 3, &model.params());
  std::vector<int32_t> prompt = {5, 17, 3, 44, 9};
  GenerateOptions o;
  o.max_tokens = 12;
  o.temperature = 0;
  ThreadPool pool(2);
  auto got = Generate(c, model.params(), prompt, o, &pool);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 12u);
  // Reference: the full-sequence forward recomputed for every new token.
  std::vector<int32_t> seq = prompt;
  for (int i = 0; i < 12; ++i) {
    std::vector<float> logits;
    ASSERT_TRUE(model.Logits(seq.data(), 1, static_cast<int64_t>(seq.size()), &logits).ok());
    const float* last = logits.data() + (seq.size() - 1) * c.vocab_size;
    int32_t best = 0;
    for (int32_t j = 1; j < c.vocab_size; ++j) {
      if (last[j] > last[best]) best = j;
    }
    EXPECT_EQ((*got)[i], best) << "token " << i;
    seq.push_back(best);
  }
}

TEST(GenerateTest, SamplingIsDeterministicPerSeedAndRespectsTopK) {
  const ModelConfig c = Config();
  ModelParams p;
  InitParams(c, 4, &p);
  GenerateOptions o;
  o.max_tokens = 20;
  o.temperature = 1.0;
  o.top_k = 1;
  o.seed = 9;
  auto top1 = Generate(c, p, {1, 2}, o);
  o.temperature = 0;
  auto greedy = Generate(c, p, {1, 2}, o);
  ASSERT_TRUE(top1.ok() && greedy.ok());
  EXPECT_EQ(*top1, *greedy);  // top_k = 1 is greedy whatever the temperature
  o.temperature = 1.5;
  o.top_k = 10;
  auto a = Generate(c, p, {1, 2}, o);
  auto b = Generate(c, p, {1, 2}, o);
  o.seed = 10;
  auto d = Generate(c, p, {1, 2}, o);
  ASSERT_TRUE(a.ok() && b.ok() && d.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *d);
}

TEST(GenerateTest, StopTokenAndErrors) {
  const ModelConfig c = Config();
  ModelParams p;
  InitParams(c, 4, &p);
  GenerateOptions o;
  o.max_tokens = 10;
  o.temperature = 0;
  auto first = Generate(c, p, {7}, o);
  ASSERT_TRUE(first.ok());
  o.stop_token = (*first)[0];
  auto stopped = Generate(c, p, {7}, o);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->size(), 1u);
  EXPECT_EQ(Generate(c, p, {}, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(Generate(c, p, {50}, o).status().message()), HasSubstr("prompt[0] = 50"));
  o.max_tokens = 40;
  EXPECT_THAT(std::string(Generate(c, p, {1}, o).status().message()),
              HasSubstr("exceeds max_position_embeddings 40"));
}

}  // namespace
}  // namespace lumen::engine
