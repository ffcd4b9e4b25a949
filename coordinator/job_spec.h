// Job specs: YAML parsing, presets, defaults and validation. Pure functions; thread-safe.
#ifndef LUMEN_COORDINATOR_JOB_SPEC_H_
#define LUMEN_COORDINATOR_JOB_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/job.pb.h"

namespace lumen {

// What the node offers, for the checks and defaults that depend on it.
struct NodeLimits {
  int64_t workers = 1;
  // The workers drive GPUs (lumend --device cuda), which train in bf16 only; CPU workers
  // train in fp32 only. A job's resources.precision defaults to the node's.
  bool has_cuda = false;
};

// Parses `yaml`, applies the model preset and defaults, resolves relative paths against
// `base_dir` and validates everything. Errors are INVALID_ARGUMENT and name the field path:
// "model.num_attention_heads: 6 does not divide model.hidden_size 256".
absl::StatusOr<JobSpec> ResolveJobSpec(absl::string_view yaml, const std::string& base_dir,
                                       const NodeLimits& limits);

// Checks a spec whose presets and defaults are already applied (see ResolveJobSpec).
absl::Status ValidateJobSpec(const JobSpec& spec, const NodeLimits& limits);

// The model fields of a preset, or NOT_FOUND listing the known presets.
absl::StatusOr<ModelSpec> ModelPreset(absl::string_view name);
std::vector<std::string> ModelPresetNames();

// Parameters of the model (embeddings, layers, final norm, LM head unless tied).
int64_t ParameterCount(const ModelSpec& model);

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_JOB_SPEC_H_
