#include "coordinator/planner/model_desc.h"

#include "coordinator/job_spec.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

JobSpec Spec(const std::string& yaml) {
  auto spec = ParseJobSpecForPlanning(yaml);
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

TEST(ModelDescTest, LayersAddUpToTheParameterCount) {
  const JobSpec spec = Spec(
      "model: {preset: lumen-104b}\ndata: {path: /nonexistent}\n"
      "train: {seq_len: 4096, micro_batch_size: 1, grad_accum_steps: 128}\n"
      "resources: {precision: bf16}\n");
  const ModelDesc m = DescribeModel(spec);
  int64_t params = 0;
  for (const LayerDesc& l : m.layers) params += l.parameters;
  EXPECT_EQ(params, ParameterCount(spec.model()));
  EXPECT_EQ(m.layers.size(), 66u + 2);
  EXPECT_NEAR(m.parameters / 1e9, 104.5, 0.5);
  // DESIGN §5: 16 B/param of state (bf16 param 2 + master 4 + m 4 + v 4 + grad 2).
  EXPECT_EQ(m.StateBytes(), 16 * m.parameters);
  // ~8 FLOPs/param/token with recompute, plus attention and the LM head.
  const double per_token = m.StepFlops() / m.TokensPerStep();
  EXPECT_GT(per_token / m.parameters, 8.0);
  EXPECT_LT(per_token / m.parameters, 8.5);
  // Checkpoint: the layer input, bf16, every micro-batch of the step.
  EXPECT_EQ(m.layers[1].bytes[static_cast<int>(TensorClass::kActivations)],
            int64_t{4096} * 12288 * 2 * 128);
}

TEST(ModelDescTest, Fp32HasNoSeparateMaster) {
  const ModelDesc m = DescribeModel(
      Spec("model: {preset: tiny}\ntrain: {seq_len: 16, micro_batch_size: 2}\n"));
  EXPECT_FALSE(m.bf16);
  EXPECT_EQ(m.TotalBytes()[static_cast<int>(TensorClass::kMaster)], 0);
  EXPECT_EQ(m.StateBytes(), 16 * m.parameters);
  EXPECT_EQ(m.micro_batches, 1);
}

TEST(ModelDescTest, PlanningParseSkipsTheDataFileButChecksTheModel) {
  auto spec = ParseJobSpecForPlanning(
      "model: {preset: tiny, num_attention_heads: 3}\ntrain: {seq_len: 16, micro_batch_size: 2}\n");
  EXPECT_THAT(spec.status().message(), HasSubstr("model.num_attention_heads: 3 does not divide"));
  EXPECT_THAT(ParseJobSpecForPlanning("model: {preset: nope}\n").status().message(),
              HasSubstr("model.preset: unknown preset 'nope'"));
  EXPECT_THAT(ParseJobSpecForPlanning("model: {preset: tiny}\n").status().message(),
              HasSubstr("train.seq_len: 0 must be positive"));
  EXPECT_THAT(ParseJobSpecForPlanning("modle: {}\n").status().message(), HasSubstr("modle"));
}

TEST(ModelDescTest, PrecisionIsTheSpecsOrTheDevices) {
  auto spec = ParseJobSpecForPlanning(
      "model: {preset: tiny}\ntrain: {seq_len: 16, micro_batch_size: 2}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(PlanningPrecision(*spec, /*device_shares_host_cpu=*/true), PRECISION_FP32);
  EXPECT_EQ(PlanningPrecision(*spec, /*device_shares_host_cpu=*/false), PRECISION_BF16);
  spec->mutable_resources()->set_precision(PRECISION_FP32);
  EXPECT_EQ(PlanningPrecision(*spec, false), PRECISION_FP32);
}

}  // namespace
}  // namespace lumen
