// How fast this engine trains one decoder layer: the device figure the planner needs for the
// CPU device (worker/device_profile.h measures it at start; benchmarks measure it at their own
// shapes).
#ifndef LUMEN_WORKER_ENGINE_LAYER_RATE_H_
#define LUMEN_WORKER_ENGINE_LAYER_RATE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "worker/engine/model.h"

namespace lumen::engine {

// FLOP/s of a decoder layer of `config` (its num_hidden_layers is ignored), forward plus
// recomputing backward over one sequence of `seq_len` tokens with `threads` threads, as a
// step runs them: through enough layers (up to 8) that their weights exceed 32 MiB, so few
// are still in the CPU's cache when they run again; the median of 3 runs. Counted as the planner counts FLOPs (coordinator/planner/model_desc.cc): 4 x (2 x matrix
// parameters + 2 x seq_len x hidden) per token.
absl::StatusOr<double> MeasureDecoderLayerFlops(ModelConfig config, int64_t seq_len, int threads);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_LAYER_RATE_H_
