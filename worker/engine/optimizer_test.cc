#include "worker/engine/optimizer.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace lumen::engine {
namespace {

TEST(AdamWTest, MatchesHandComputedTwoSteps) {
  AdamWHyper h;
  h.lr = 0.1;
  h.beta1 = 0.9;
  h.beta2 = 0.999;
  h.eps = 1e-8;
  h.weight_decay = 0.01;
  float p = 1.0f, m = 0.0f, v = 0.0f;
  float g = 0.5f;
  AdamWUpdate(&p, &g, &m, &v, 1, h, 1);
  // Step 1: p = 0.999 - 1.0 * 0.05 / (0.5 + 1e-8).
  EXPECT_NEAR(m, 0.05, 1e-8);
  EXPECT_NEAR(v, 0.00025, 1e-10);
  EXPECT_NEAR(p, 0.999 - 0.05 / (0.5 + 1e-8), 1e-6);
  g = -0.25f;
  const double p1 = p;
  AdamWUpdate(&p, &g, &m, &v, 1, h, 2);
  const double m2 = 0.9 * 0.05 + 0.1 * -0.25;                  // 0.02
  const double v2 = 0.999 * 0.00025 + 0.001 * 0.0625;          // 0.00031225
  const double denom = std::sqrt(v2) / std::sqrt(1 - 0.999 * 0.999) + 1e-8;
  const double expected = p1 * 0.999 - 0.1 / (1 - 0.81) * m2 / denom;
  EXPECT_NEAR(m, m2, 1e-8);
  EXPECT_NEAR(v, v2, 1e-10);
  EXPECT_NEAR(p, expected, 1e-6);
  EXPECT_NEAR(p, 0.8714673, 1e-6);  // 0.898101 - 0.526316 * 0.02 / 0.395226
}

TEST(AdamWTest, NoDecayWhenZero) {
  AdamWHyper h;
  h.lr = 0.5;
  h.weight_decay = 0.0;
  float p = 2.0f, m = 0.0f, v = 0.0f, g = 0.0f;
  AdamWUpdate(&p, &g, &m, &v, 1, h, 1);
  EXPECT_EQ(p, 2.0f);
}

TEST(ScheduleTest, WarmupThenCosine) {
  OptimizerConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup_steps = 4;
  c.schedule = ScheduleKind::kCosine;
  EXPECT_DOUBLE_EQ(LearningRate(c, 0, 14), 0.25);
  EXPECT_DOUBLE_EQ(LearningRate(c, 3, 14), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(c, 4, 14), 1.0);
  EXPECT_NEAR(LearningRate(c, 9, 14), 0.1 + 0.45 * (1 + std::cos(M_PI * 0.5)), 1e-15);
  EXPECT_NEAR(LearningRate(c, 14, 14), 0.1, 1e-15);
  c.schedule = ScheduleKind::kConstant;
  EXPECT_DOUBLE_EQ(LearningRate(c, 1, 14), 0.5);
  EXPECT_DOUBLE_EQ(LearningRate(c, 9, 14), 1.0);
}

TEST(ClipTest, ClipsLikeTorch) {
  std::vector<float> a = {3.0f, 0.0f}, b = {4.0f};
  const double norm = ClipGradNorm({{a.data(), 2}, {b.data(), 1}}, 1.0);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  const float coef = static_cast<float>(1.0 / (5.0 + 1e-6));
  EXPECT_FLOAT_EQ(a[0], 3.0f * coef);
  EXPECT_FLOAT_EQ(b[0], 4.0f * coef);
  // Below the threshold nothing changes.
  std::vector<float> c = {0.3f, 0.4f};
  EXPECT_NEAR(ClipGradNorm({{c.data(), 2}}, 1.0), 0.5, 1e-7);
  EXPECT_EQ(c[0], 0.3f);
  // Off.
  std::vector<float> d = {30.0f, 40.0f};
  EXPECT_NEAR(ClipGradNorm({{d.data(), 2}}, 0.0), 50.0, 1e-9);
  EXPECT_EQ(d[0], 30.0f);
}

}  // namespace
}  // namespace lumen::engine
