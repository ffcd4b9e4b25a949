// `lumenctl plan` output: a plan as text for people and as one JSON object. Pure functions;
// thread-safe.
#ifndef LUMEN_COORDINATOR_PLANNER_REPORT_H_
#define LUMEN_COORDINATOR_PLANNER_REPORT_H_

#include <string>

#include "coordinator/planner/hardware_profile.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/planner.h"

namespace lumen {

// Multi-line text: parameters, bytes per tier per tensor class, fits (or why not and what to
// change), predicted step time, tokens/s, busy fractions, binding resource, NVMe writes.
std::string PlanText(const std::string& job_name, const ModelDesc& model,
                     const HardwareProfile& hw, const Plan& plan);

// One JSON object (no trailing newline). Fields: fits, why_not, suggestions, parameters,
// tokens_per_step, hardware, workers, parallelism, placement, tier_bytes
// {tier: {class: bytes, buffers, total, capacity}}, predicted_step_time_s, tokens_per_s,
// device_busy_fraction, flops_utilization, binding_resource, binding_busy_fraction,
// resource_busy_fraction, bytes_moved, nvme_bytes_written_per_step, nvme_bytes_written_per_day,
// candidates. Prediction fields are absent when the plan does not fit.
std::string PlanJson(const std::string& job_name, const ModelDesc& model,
                     const HardwareProfile& hw, const Plan& plan);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_REPORT_H_
