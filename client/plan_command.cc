#include "client/plan_command.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "common/units.h"
#include "coordinator/planner/hardware_profile.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/node_profile.h"
#include "coordinator/planner/planner.h"
#include "coordinator/planner/report.h"

namespace lumen {
namespace {

int Fail(std::ostream& err, const absl::Status& status) {
  err << "lumenctl plan: " << status.message() << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ||
                 status.code() == absl::StatusCode::kNotFound
             ? 2
             : 1;
}

}  // namespace

int RunPlanCommand(const PlanCommandOptions& options, std::ostream& out, std::ostream& err) {
  std::ifstream in(options.job_file);
  if (!in) {
    return Fail(err, absl::InvalidArgumentError("cannot read job spec " + options.job_file));
  }
  std::stringstream text;
  text << in.rdbuf();
  auto spec = ParseJobSpecForPlanning(text.str());
  if (!spec.ok()) {
    return Fail(err, absl::InvalidArgumentError(options.job_file + ": " +
                                                std::string(spec.status().message())));
  }
  const bool on_node = options.hardware == kNodeHardware;
  absl::StatusOr<HardwareProfile> hw;
  NodeProfile node;
  if (on_node) {
    if (options.node == nullptr) {
      return Fail(err, absl::InvalidArgumentError("--hardware node needs a running node"));
    }
    auto measured = NodeHardwareProfile(*options.node, spec->model().hidden_size());
    if (!measured.ok()) return Fail(err, measured.status());
    node = *std::move(measured);
    hw = node.hardware;
  } else {
    hw = LoadHardwareProfile(options.hardware.empty() ? kDefaultHardwareProfile
                                                      : options.hardware);
  }
  if (!hw.ok()) return Fail(err, hw.status());
  PlannerOptions planner;
  planner.workers =
      options.workers > 0 ? options.workers : static_cast<int>(spec->resources().workers());
  if (on_node) {
    planner.device_budget_bytes = node.device_budget_bytes;
    planner.optimizer_state_on_nvme = node.optimizer_state_on_nvme;
    // The layout a node runs a job on several workers in (as PlanJobOnNode plans it).
    planner.stages = 1;
  }
  if (!options.device_memory.empty()) {
    auto bytes = ParseBytes(options.device_memory);
    if (!bytes.ok()) {
      return Fail(err, absl::InvalidArgumentError("--device-memory: " +
                                                  std::string(bytes.status().message())));
    }
    planner.device_budget_bytes = *bytes;
  }
  spec->mutable_resources()->set_precision(PlanningPrecision(*spec, hw->device.shares_host_cpu));
  const ModelDesc model = DescribeModel(*spec);
  auto plan = PlanJob(model, *hw, planner);
  if (!plan.ok()) return Fail(err, plan.status());
  if (options.json) {
    out << PlanJson(spec->name(), model, *hw, *plan) << "\n";
  } else {
    out << PlanText(spec->name(), model, *hw, *plan);
  }
  return plan->fits ? 0 : 3;
}

}  // namespace lumen
