#include "coordinator/planner/planner.h"

#include <iostream>

#include "coordinator/planner/report.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

ModelDesc Model(const std::string& preset, int64_t seq_len, int64_t micro_batch_size,
                int64_t grad_accum_steps, const std::string& precision = "bf16") {
  auto spec = ParseJobSpecForPlanning(
      "model: {preset: " + preset + "}\n" + "train: {seq_len: " + std::to_string(seq_len) +
      ", micro_batch_size: " + std::to_string(micro_batch_size) +
      ", grad_accum_steps: " + std::to_string(grad_accum_steps) + "}\n" +
      "resources: {precision: " + precision + "}\n");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return DescribeModel(*spec);
}

HardwareProfile Hw(const std::string& name) {
  auto hw = LoadHardwareProfile(name);
  EXPECT_TRUE(hw.ok()) << hw.status();
  return *hw;
}

Plan MustPlan(const ModelDesc& m, const HardwareProfile& hw, int workers,
              int64_t budget = 0) {
  PlannerOptions opt;
  opt.workers = workers;
  opt.device_budget_bytes = budget;
  auto plan = PlanJob(m, hw, opt);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return plan.ok() ? *std::move(plan) : Plan{};
}

int64_t Nvme(const Plan& p, TensorClass c) {
  return p.tiers[static_cast<int>(Tier::kNvme)].home[static_cast<int>(c)];
}

// DESIGN §5: 104B on 8 × RTX 4090 with an ordinary LLM batch (512 Ki tokens a step).
TEST(PlannerTest, Lumen104bOn8xRtx4090AgreesWithDesignArithmetic) {
  const ModelDesc m = Model("lumen-104b", 4096, 1, 128);
  const HardwareProfile hw = Hw("8x-rtx4090");
  const Plan plan = MustPlan(m, hw, 8);
  std::cout << PlanText("lumen-104b", m, hw, plan);
  ASSERT_TRUE(plan.fits) << plan.why_not;
  // ≈16 B/param ≈ 1.7 TB of state: the optimizer state cannot stay in 512 GB of RAM.
  EXPECT_NEAR(static_cast<double>(plan.state_bytes) / plan.parameters, 16.0, 1e-9);
  EXPECT_NEAR(plan.state_bytes / 1e12, 1.67, 0.05);
  EXPECT_FALSE(plan.placement.optimizer_on_device);
  EXPECT_GT(Nvme(plan, TensorClass::kAdamM), Nvme(plan, TensorClass::kAdamM) / 2);
  EXPECT_GT(Nvme(plan, TensorClass::kAdamM) + Nvme(plan, TensorClass::kMaster),
            8 * plan.parameters / 2);
  // Compute binds: ≈1,350 tokens/s at ~85% of peak, devices busy.
  EXPECT_EQ(plan.sim.binding_resource, "device compute");
  EXPECT_GT(plan.tokens_per_s, 1150);
  EXPECT_LT(plan.tokens_per_s, 1550);
  EXPECT_GT(plan.sim.device_busy_fraction, 0.85);
  EXPECT_GT(plan.flops_utilization, 0.75);
  EXPECT_LT(plan.flops_utilization, 0.92);
  // ~24 B/param/step of optimizer-state NVMe traffic (12 read + 12 written); checkpoints that
  // do not fit in host RAM add to it.
  const double nvme_per_param =
      static_cast<double>(plan.sim.nvme_bytes_read + plan.sim.nvme_bytes_written) /
      plan.parameters;
  EXPECT_GT(nvme_per_param, 18);
  EXPECT_LT(nvme_per_param, 45);
  EXPECT_GT(plan.nvme_bytes_written_per_day, int64_t{100'000'000'000'000});  // > 100 TB/day
  // Every parallelism was evaluated.
  bool saw_pipeline = false, saw_data_parallel = false;
  for (const Candidate& c : plan.candidates) {
    saw_pipeline |= c.parallelism.stages == 8;
    saw_data_parallel |= c.parallelism.replicas == 8;
  }
  EXPECT_TRUE(saw_pipeline);
  EXPECT_TRUE(saw_data_parallel);
}

// With a small batch the fixed ~24 B/param of NVMe traffic cannot hide behind compute.
TEST(PlannerTest, Lumen104bWithSmallBatchIsNvmeBound) {
  const ModelDesc m = Model("lumen-104b", 4096, 1, 16);
  const HardwareProfile hw = Hw("8x-rtx4090");
  const Plan plan = MustPlan(m, hw, 8);
  ASSERT_TRUE(plan.fits) << plan.why_not;
  EXPECT_EQ(plan.sim.binding_resource, "nvme");
  EXPECT_LT(plan.sim.device_busy_fraction, 0.5);
  ASSERT_FALSE(plan.suggestions.empty());
  EXPECT_THAT(plan.suggestions[0], HasSubstr("nvme binds"));
  EXPECT_THAT(plan.suggestions[0], HasSubstr("train.grad_accum_steps >="));
}

TEST(PlannerTest, Llama8bFitsDifferentlyOnH100AndRtx4090) {
  // Micro-batches of 2 x 8192 tokens: the LM head's fp32 logits alone are 8.4 GB.
  const ModelDesc m = Model("llama3-8b", 8192, 2, 8);
  const Plan h100 = MustPlan(m, Hw("1x-h100"), 1);
  const Plan rtx = MustPlan(m, Hw("1x-rtx4090"), 1);
  ASSERT_TRUE(h100.fits) << h100.why_not;
  ASSERT_TRUE(rtx.fits) << rtx.why_not;
  // 80 GB keeps the bf16 parameters (16 GB) on the device; 24 GB must stream them.
  EXPECT_TRUE(h100.placement.params_resident);
  EXPECT_FALSE(rtx.placement.params_resident);
  EXPECT_GT(rtx.placement.prefetch_distance, 0);
  EXPECT_GT(h100.tokens_per_s, 2 * rtx.tokens_per_s);
  EXPECT_LE(rtx.device_peak_bytes, rtx.device_budget_bytes);
  EXPECT_LE(h100.device_peak_bytes, h100.device_budget_bytes);
}

TEST(PlannerTest, SmallModelStaysOnTheDevice) {
  const ModelDesc m = Model("small", 256, 8, 1, "fp32");
  const Plan plan = MustPlan(m, Hw("1x-rtx4090"), 1);
  ASSERT_TRUE(plan.fits);
  EXPECT_TRUE(plan.placement.optimizer_on_device);
  EXPECT_TRUE(plan.placement.activations_on_device);
  EXPECT_EQ(plan.sim.nvme_bytes_written, 0);
  EXPECT_EQ(plan.sim.bytes_moved.count("host->device"), 0u);
  EXPECT_EQ(plan.sim.binding_resource, "device compute");
}

TEST(PlannerTest, JobThatCannotFitIsReportedWithBytes) {
  // 512 Ki-token steps of 104B on one desktop: state 1.7 TB + checkpoints 3.4 TB > 4 TB NVMe.
  const ModelDesc m = Model("lumen-104b", 4096, 1, 512);
  const Plan plan = MustPlan(m, Hw("1x-rtx4090"), 1);
  EXPECT_FALSE(plan.fits);
  EXPECT_THAT(plan.why_not, HasSubstr("across tiers, node has"));
  EXPECT_THAT(plan.why_not, HasSubstr("TiB"));
  EXPECT_GT(plan.bytes_needed, plan.node_capacity_bytes);
  ASSERT_FALSE(plan.suggestions.empty());
  EXPECT_THAT(plan.suggestions[0], HasSubstr("short"));
  EXPECT_EQ(AdmissionStatus(plan).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(PlanJson("x", m, Hw("1x-rtx4090"), plan), HasSubstr("\"fits\":false"));
}

TEST(PlannerTest, TooSmallDeviceBudgetNamesTheLayer) {
  const ModelDesc m = Model("llama3-8b", 8192, 1, 4);
  const Plan plan = MustPlan(m, Hw("1x-rtx4090"), 1, int64_t{3} << 30);
  EXPECT_FALSE(plan.fits);
  EXPECT_THAT(plan.why_not, HasSubstr("layer layers.0 needs"));
  EXPECT_THAT(plan.why_not, HasSubstr("the device budget is 3.0 GiB"));
}

// With no room for a second parameter buffer the plan reads each layer when it starts, as the
// worker does at such a budget, instead of refusing a job the worker can run.
TEST(PlannerTest, TightBudgetReadsParametersOnDemand) {
  auto spec = ParseJobSpecForPlanning(
      "model: {preset: tiny, num_hidden_layers: 32}\n"
      "train: {seq_len: 32, micro_batch_size: 2, grad_accum_steps: 2}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const ModelDesc m = DescribeModel(*spec);
  const Plan tight = MustPlan(m, Hw("1x-rtx4090"), 1, int64_t{1} << 20);
  ASSERT_TRUE(tight.fits) << tight.why_not;
  EXPECT_FALSE(tight.placement.params_resident);
  EXPECT_EQ(tight.placement.prefetch_distance, 0);
  EXPECT_EQ(tight.placement.param_buffers, 1);
  EXPECT_LE(tight.device_peak_bytes, int64_t{1} << 20);
  const Plan roomy = MustPlan(m, Hw("1x-rtx4090"), 1, int64_t{2} << 20);
  ASSERT_TRUE(roomy.fits) << roomy.why_not;
  EXPECT_FALSE(roomy.placement.params_resident);
  EXPECT_GE(roomy.placement.prefetch_distance, 1);
  EXPECT_LT(roomy.sim.step_time_s, tight.sim.step_time_s);
}

TEST(PlannerTest, TooManyWorkersIsAnOptionError) {
  PlannerOptions opt;
  opt.workers = 2;
  auto plan = PlanJob(Model("tiny", 16, 2, 1), Hw("1x-h100"), opt);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("workers: 2 must be between 1 and the 1 devices"));
}

TEST(PlannerTest, JsonHasTheDocumentedFields) {
  const ModelDesc m = Model("small", 256, 8, 1, "fp32");
  const HardwareProfile hw = Hw("1x-rtx4090");
  const std::string json = PlanJson("q", m, hw, MustPlan(m, hw, 1));
  for (const char* field :
       {"\"fits\":true", "\"parameters\":", "\"tier_bytes\":{\"device\":{\"params\":",
        "\"predicted_step_time_s\":", "\"tokens_per_s\":", "\"device_busy_fraction\":",
        "\"binding_resource\":\"device compute\"", "\"nvme_bytes_written_per_step\":0",
        "\"nvme_bytes_written_per_day\":0", "\"parallelism\":{\"name\":\"single worker\""}) {
    EXPECT_THAT(json, HasSubstr(field));
  }
}

}  // namespace
}  // namespace lumen
