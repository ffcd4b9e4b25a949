#include "coordinator/planner/predict.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/planner.h"

namespace lumen {

absl::StatusOr<double> PredictStepTime(const JobSpec& spec, const GetClusterInfoReply& cluster) {
  ASSIGN_OR_RETURN(NodeProfile node, NodeHardwareProfile(cluster, spec.model().hidden_size()));
  PlannerOptions options;
  options.workers = 1;  // one running job per node, on one worker
  options.device_budget_bytes = node.device_budget_bytes;
  options.optimizer_state_on_nvme = node.optimizer_state_on_nvme;
  ASSIGN_OR_RETURN(Plan plan, PlanJob(DescribeModel(spec), node.hardware, options));
  if (!plan.fits) {
    return absl::FailedPreconditionError(absl::StrCat("the plan does not fit: ", plan.why_not));
  }
  return plan.sim.step_time_s;
}

}  // namespace lumen
