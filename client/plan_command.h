// `lumenctl plan JOB.yaml [--hardware FILE|NAME] [--workers N] [--json]`: plans a job on a
// hardware profile without a node (DESIGN §3) and prints the prediction. Thread-safe.
#ifndef LUMEN_CLIENT_PLAN_COMMAND_H_
#define LUMEN_CLIENT_PLAN_COMMAND_H_

#include <cstdint>
#include <ostream>
#include <string>

namespace lumen {

class GetClusterInfoReply;  // proto/lumen.proto

struct PlanCommandOptions {
  // The job spec (YAML). Its data file need not exist: planning reads only the model, batch
  // and resources sections.
  std::string job_file;
  // A profile file, or the name of a built-in profile (deploy/hardware/*.yaml: 1x-rtx4090,
  // 1x-h100, 8x-rtx4090). Defaults to 1x-rtx4090, the smallest node Lumen targets; the output
  // names the profile so it is never mistaken for the machine lumenctl runs on.
  std::string hardware = "1x-rtx4090";
  // Workers to plan for; 0 = the job's resources.workers.
  int workers = 0;
  // Per-worker device memory budget, e.g. "8GiB"; empty = the profile's usable memory.
  std::string device_memory;
  // One JSON object instead of text.
  bool json = false;
  // With hardware "node": the running node's cluster info (its measured figures), fetched by
  // the caller. The plan then uses the node's worker count, device budget, link model and
  // optimizer-state tier unless the options above say otherwise.
  const GetClusterInfoReply* node = nullptr;
};

// The hardware name that means "the node lumenctl is connected to, as it measured itself".
inline constexpr char kNodeHardware[] = "node";

// Runs the command. Returns 0 when the job fits, 3 when it does not (the report says why),
// 2 for a bad job spec, option or profile (message on `err`), 1 for other failures.
int RunPlanCommand(const PlanCommandOptions& options, std::ostream& out, std::ostream& err);

}  // namespace lumen

#endif  // LUMEN_CLIENT_PLAN_COMMAND_H_
