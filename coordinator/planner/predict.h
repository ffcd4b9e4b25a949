// The step time the planner predicts for a job on the running node (its measured figures),
// which the coordinator puts beside every measured step. Pure function; thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_PREDICT_H_
#define LUMEN_COORDINATOR_PLANNER_PREDICT_H_

#include "absl/status/statusor.h"
#include "coordinator/planner/node_profile.h"
#include "proto/job.pb.h"

namespace lumen {

// Plans `spec` on the node described by `cluster` (NodeHardwareProfile, one worker, the node's
// budget and optimizer-state tier) and returns the simulated step time: the steady state, from
// the second step on (the first is traced and fetches on demand). FAILED_PRECONDITION when the
// node has no measured figures or the plan does not fit (with the planner's reason).
absl::StatusOr<double> PredictStepTime(const JobSpec& spec, const GetClusterInfoReply& cluster);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_PREDICT_H_
