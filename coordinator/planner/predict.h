// What the planner says about a job on the running node (its measured figures): the step time
// the coordinator puts beside every measured step, and the step schedule it pushes to the
// worker with the task. Pure functions; thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_PREDICT_H_
#define LUMEN_COORDINATOR_PLANNER_PREDICT_H_

#include "absl/status/statusor.h"
#include "coordinator/planner/node_profile.h"
#include "proto/job.pb.h"

namespace lumen {

// coordinator/planner/schedule.h (not included: its Tier clashes with proto/lumen.proto's, and
// the coordinator's main includes both).
struct Schedule;

// Plans `spec` on the node described by `cluster` (NodeHardwareProfile; one worker, or
// resources.workers as data-parallel replicas; the node's budget and optimizer-state tier,
// every micro-batch in one group as the engine runs them) and
// returns worker 0's schedule with the simulated step time (predicted_step_time_s: the steady
// state, from the second step on). FAILED_PRECONDITION when the node has no measured figures or
// the plan does not fit (with the planner's reason).
absl::StatusOr<StepSchedule> PlanJobOnNode(const JobSpec& spec, const GetClusterInfoReply& cluster);

// The ops of `schedule` that `worker` runs or that the host runs for it (compute, transfers
// onto and off its device, releases, optimizer updates, the step's end), with the simulated
// start and duration of each (`op_start_s` / `op_end_s` of the simulation, by op id; may be
// empty). A dependency on an op left out becomes a dependency on that op's own kept
// dependencies.
StepSchedule WorkerSchedule(const Schedule& schedule, int worker,
                            const std::vector<double>& op_start_s,
                            const std::vector<double>& op_end_s);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_PREDICT_H_
