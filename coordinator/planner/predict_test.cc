#include "coordinator/planner/predict.h"

#include <map>
#include <utility>

#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/planner.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

// Llama-3 8B on one RTX 4090 capped to 8 GiB: parameters stream through the device.
TEST(WorkerScheduleTest, KeepsTheWorkersOpsInOrderWithTheirDependencies) {
  auto spec = ParseJobSpecForPlanning(
      "model: {preset: llama3-8b}\n"
      "train: {seq_len: 1024, micro_batch_size: 1, grad_accum_steps: 8}\n"
      "resources: {precision: bf16}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const ModelDesc m = DescribeModel(*spec);
  auto hw = LoadHardwareProfile("1x-rtx4090");
  ASSERT_TRUE(hw.ok()) << hw.status();
  PlannerOptions opt;
  opt.groups = 1;
  opt.device_budget_bytes = int64_t{8} << 30;
  auto plan = PlanJob(m, *hw, opt);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->fits) << plan->why_not << "; candidates " << plan->candidates.size()
                          << (plan->candidates.empty() ? "" : plan->candidates[0].reason);
  ASSERT_FALSE(plan->placement.params_resident);

  const StepSchedule s = WorkerSchedule(plan->schedule, 0, plan->sim.op_start_s, plan->sim.op_end_s);
  const int layers = static_cast<int>(m.layers.size());  // embedding, decoder layers, head
  // Compute: every layer forward from the embedding, then backward from the head.
  std::vector<std::pair<ScheduleOp::Phase, int>> compute;
  std::map<int, int> first_prefetch;  // layer -> index of its first parameter prefetch
  int releases = 0;
  for (int i = 0; i < s.ops_size(); ++i) {
    const ScheduleOp& op = s.ops(i);
    for (int d : op.deps()) EXPECT_LT(d, i) << op.label();
    EXPECT_GE(op.predicted_start_s(), 0) << op.label();
    EXPECT_GE(op.predicted_duration_s(), 0) << op.label();
    for (int d : op.deps()) {
      EXPECT_LE(s.ops(d).predicted_start_s() + s.ops(d).predicted_duration_s(),
                op.predicted_start_s() + 1e-9)
          << op.label() << " starts before " << s.ops(d).label() << " ends";
    }
    switch (op.kind()) {
      case ScheduleOp::COMPUTE:
        compute.emplace_back(op.phase(), op.layer());
        break;
      case ScheduleOp::PREFETCH:
        if (op.tensor() == "params") first_prefetch.emplace(op.layer(), i);
        break;
      case ScheduleOp::RELEASE:
        ++releases;
        break;
      default:
        break;
    }
    if (op.kind() == ScheduleOp::COMPUTE && op.phase() == ScheduleOp::FORWARD) {
      // Its parameters were prefetched before it, and it waits for them.
      ASSERT_TRUE(first_prefetch.count(op.layer())) << op.label();
      bool waits = false;
      for (int d : op.deps()) waits |= d == first_prefetch[op.layer()];
      EXPECT_TRUE(waits) << op.label();
    }
  }
  ASSERT_EQ(static_cast<int>(compute.size()), 2 * layers);
  for (int l = 0; l < layers; ++l) {
    EXPECT_EQ(compute[l], std::make_pair(ScheduleOp::FORWARD, l));
    EXPECT_EQ(compute[layers + l], std::make_pair(ScheduleOp::BACKWARD, layers - 1 - l));
  }
  EXPECT_EQ(releases, 2 * layers);
  EXPECT_EQ(s.ops(s.ops_size() - 1).kind(), ScheduleOp::WAIT);
  // No host-only op (NVMe reads, reductions) is kept.
  for (const ScheduleOp& op : s.ops()) EXPECT_NE(op.kind(), ScheduleOp::KIND_UNSPECIFIED);
}

}  // namespace
}  // namespace lumen
