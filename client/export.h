// `lumenctl export`: copies one checkpoint directory of a job to a directory of the user's.
// Reads the node's files directly, so it runs on the node's machine. Free functions;
// thread-safe for distinct destinations.
#ifndef LUMEN_CLIENT_EXPORT_H_
#define LUMEN_CLIENT_EXPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lumen {

struct ExportOptions {
  // The job's output directory (Job.output_dir), holding step-<N>/ checkpoints.
  std::string output_dir;
  // The checkpoint to copy; -1 = the latest complete one.
  int64_t step = -1;
  // The destination: must not exist, or be an empty directory.
  std::string out;
};

// The steps of the complete checkpoints in `output_dir` (step-<N> directories; the temporary
// .step-<N>.tmp ones are not complete), ascending. Empty when there are none.
std::vector<int64_t> ListCheckpointSteps(const std::string& output_dir);

// Copies the checkpoint to a temporary directory beside `out` and renames it into place, so
// `out` is either complete or untouched. Returns the checkpoint directory that was copied.
// NOT_FOUND listing the available steps when `step` has no checkpoint; FAILED_PRECONDITION
// when there is none yet or `out` is not empty.
absl::StatusOr<std::string> ExportCheckpoint(const ExportOptions& options);

}  // namespace lumen

#endif  // LUMEN_CLIENT_EXPORT_H_
