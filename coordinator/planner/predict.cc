#include "coordinator/planner/predict.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/planner.h"
#include "coordinator/planner/schedule.h"

namespace lumen {

absl::StatusOr<StepSchedule> PlanJobOnNode(const JobSpec& spec, const GetClusterInfoReply& cluster) {
  ASSIGN_OR_RETURN(NodeProfile node, NodeHardwareProfile(cluster, spec.model().hidden_size()));
  PlannerOptions options;
  // One worker, or several as data-parallel replicas (resources.workers): the node runs no
  // pipeline stages.
  options.workers = static_cast<int>(std::max<int64_t>(1, spec.resources().workers()));
  options.stages = 1;
  options.groups = 1;  // the engine runs every micro-batch of a layer at once
  options.device_budget_bytes = node.device_budget_bytes;
  options.optimizer_state_on_nvme = node.optimizer_state_on_nvme;
  ASSIGN_OR_RETURN(Plan plan, PlanJob(DescribeModel(spec), node.hardware, options));
  if (!plan.fits) {
    return absl::FailedPreconditionError(absl::StrCat("the plan does not fit: ", plan.why_not));
  }
  StepSchedule schedule = WorkerSchedule(plan.schedule, 0, plan.sim.op_start_s, plan.sim.op_end_s);
  schedule.set_prefetch_distance(plan.placement.prefetch_distance);
  schedule.set_predicted_step_time_s(plan.sim.step_time_s);
  return schedule;
}

namespace {

bool Kept(const Op& op, int worker) {
  switch (op.kind) {
    case OpKind::kCompute:
    case OpKind::kRelease:
      return op.worker == worker;
    case OpKind::kTransfer:
      return op.worker == worker && (op.src == Tier::kDevice || op.dst == Tier::kDevice);
    case OpKind::kOptimizer:
      return op.worker == worker || op.worker < 0;
    case OpKind::kWait:
      return true;
    case OpKind::kReduce:
      return false;
  }
  return false;
}

ScheduleOp::Kind KindOf(const Op& op) {
  switch (op.kind) {
    case OpKind::kCompute:
      return ScheduleOp::COMPUTE;
    case OpKind::kTransfer:
      return op.dst == Tier::kDevice ? ScheduleOp::PREFETCH : ScheduleOp::OFFLOAD;
    case OpKind::kRelease:
      return ScheduleOp::RELEASE;
    case OpKind::kOptimizer:
      return ScheduleOp::OPTIMIZER;
    case OpKind::kWait:
    case OpKind::kReduce:
      break;
  }
  return ScheduleOp::WAIT;
}

}  // namespace

StepSchedule WorkerSchedule(const Schedule& schedule, int worker,
                            const std::vector<double>& op_start_s,
                            const std::vector<double>& op_end_s) {
  StepSchedule out;
  const size_t n = schedule.ops.size();
  std::vector<int32_t> index(n, -1);  // op id -> index in out.ops
  // Per op id: the kept ops it waits for, directly or through ops left out. Dependencies are
  // always earlier ops, so one pass in order resolves them.
  std::vector<std::vector<int32_t>> kept_deps(n);
  for (size_t id = 0; id < n; ++id) {
    const Op& op = schedule.ops[id];
    std::set<int32_t> deps;
    for (int32_t d : op.deps) {
      if (d < 0 || static_cast<size_t>(d) >= id) continue;
      if (index[d] >= 0) {
        deps.insert(index[d]);
      } else {
        deps.insert(kept_deps[d].begin(), kept_deps[d].end());
      }
    }
    kept_deps[id].assign(deps.begin(), deps.end());
    if (!Kept(op, worker)) continue;
    index[id] = out.ops_size();
    ScheduleOp* o = out.add_ops();
    o->set_kind(KindOf(op));
    o->set_layer(op.layer);
    o->set_phase(op.phase == Phase::kForward    ? ScheduleOp::FORWARD
                 : op.phase == Phase::kBackward ? ScheduleOp::BACKWARD
                                                : ScheduleOp::PHASE_NONE);
    if (op.kind == OpKind::kTransfer || op.kind == OpKind::kRelease) {
      o->set_tensor(TensorClassName(op.tensor));
    }
    o->set_bytes(op.bytes);
    for (int32_t d : kept_deps[id]) o->add_deps(d);
    o->set_label(op.label);
    if (id < op_start_s.size() && id < op_end_s.size()) {
      o->set_predicted_start_s(op_start_s[id]);
      o->set_predicted_duration_s(op_end_s[id] - op_start_s[id]);
    }
  }
  return out;
}

}  // namespace lumen
