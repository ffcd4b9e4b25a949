// Single-process CPU training loop: data → forward/backward over grad_accum_steps
// micro-batches → global-norm clipping → AdamW, following DESIGN.md §7.
// Thread-compatible: one thread drives a Trainer; it uses num_threads threads internally.
#ifndef LUMEN_WORKER_ENGINE_TRAINER_H_
#define LUMEN_WORKER_ENGINE_TRAINER_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/data.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/thread_pool.h"

namespace lumen::engine {

struct TrainConfig {
  // Total optimizer steps S (the cosine schedule's horizon).
  int64_t steps = 1000;
  int64_t seq_len = 256;
  int64_t micro_batch_size = 8;
  // Micro-batches per optimizer step; the step loss is the mean over all of them.
  int64_t grad_accum_steps = 1;
  // Seeds the weight initialisation (see InitParams).
  uint64_t seed = 1234;
};

struct TrainerOptions {
  ModelConfig model;
  OptimizerConfig optimizer;
  TrainConfig train;
  DataConfig data;
  // Optional safetensors file or exported HF directory to start from instead of random init.
  std::string init_from;
  // Optional optimizer.safetensors (SaveOptimizerState) to continue from: AdamW's moments and
  // the step counter, which sets the data position and the learning rate. With init_from the
  // same checkpoint's weights, training continues as if it had not stopped.
  std::string optimizer_state_from;
  // Keep only layer inputs during the forward and recompute each layer in the backward: less
  // memory, ~1/3 more compute; results are bit-identical either way.
  bool activation_checkpointing = false;
  // Threads for our kernels and for OpenBLAS (a process-wide OpenBLAS setting).
  int num_threads = 1;
};

struct StepResult {
  int64_t step = 0;          // 0-based index of the step just done
  double loss = 0;           // mean token cross-entropy over the whole step
  double lr = 0;             // learning rate used
  double grad_norm = 0;      // global gradient norm before clipping
  int64_t tokens = 0;        // tokens processed (A * B * T)
  double step_time_s = 0;    // wall time of the step
};

// Checks the options both trainers share (model config, train geometry, warmup); errors are
// INVALID_ARGUMENT naming the field.
absl::Status ValidateTrainerOptions(const TrainerOptions& options);

// Random initialisation: one std::mt19937_64(seed) stream over the tensors in NamedTensors
// order (HF named_parameters order); each element of a 2-D tensor is init_std * z with z from
// Box–Muller on that stream (u1 = ((x1 >> 11) + 1) * 2^-53, u2 = (x2 >> 11) * 2^-53,
// z0 = sqrt(-2 ln u1) cos(2 pi u2) used first, then z1 = ... sin(2 pi u2); the pair spans
// tensors). Norm weights are 1 and draw nothing. With `pool` (of more than one thread) this
// thread draws the stream while the pool's threads turn it into values: the same values,
// several times faster on a large model.
void InitParams(const ModelConfig& config, uint64_t seed, ModelParams* params,
                ThreadPool* pool = nullptr);

// InitParams' values a tensor at a time: Read must be called for the tensors in NamedTensors
// order (FAILED_PRECONDITION naming the tensor expected otherwise), and holds nothing but the
// stream's state between calls. Thread-compatible; `pool` as InitParams' (may be null) must
// outlive it.
class RandomWeights : public WeightsSource {
 public:
  RandomWeights(const ModelConfig& config, uint64_t seed, ThreadPool* pool = nullptr);
  absl::Status Read(const std::string& name, float* dst) override;

 private:
  // The next `n` values of the stream into `dst`.
  void Draw(float* dst, int64_t n);

  struct Expected {
    std::string name;
    int64_t size;
    bool matrix;
  };
  std::vector<Expected> order_;
  size_t next_ = 0;       // index into order_
  double init_std_;
  ThreadPool* pool_;
  std::mt19937_64 rng_;
  int64_t position_ = 0;  // stream values handed out so far
  float spare_ = 0;       // value `position_` when it is odd: the second of the last pair
};

// Step()'s check of the global gradient norm, exposed for tests: OK when `grad_norm` is
// finite, else FAILED_PRECONDITION "step S: gradient norm is nan (loss L; first non-finite
// gradient in NAME) ..." naming the first of `grads` holding a non-finite element.
absl::Status CheckGradNormFinite(int64_t step, double grad_norm, double loss,
                                 const std::vector<NamedTensor<float>>& grads);

class Trainer {
 public:
  // INVALID_ARGUMENT for a bad config (naming the field); data/init_from errors as returned by
  // TokenDataset::Open and LoadWeights.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainerOptions& options);

  // Runs one optimizer step. On error the parameters, optimizer state and step counter are
  // unchanged (gradients are scratch and may hold anything). Errors: INVALID_ARGUMENT for a
  // token >= vocab_size in the data; FAILED_PRECONDITION when a micro-batch loss is not
  // finite ("step 17: loss is nan (micro-batch 1 of 2) ...", micro-batches counted from 1) or
  // the global gradient norm is not finite (naming the first tensor with a non-finite
  // gradient). Steps are 0-based, as in StepResult::step.
  absl::StatusOr<StepResult> Step();

  // Writes config.json, the weights (model.safetensors, or shards and
  // model.safetensors.index.json past 2 GB: see ExportHfDirectory) and
  // optimizer.safetensors into `dir`.
  absl::Status Export(const std::string& dir) const;

  // Restores AdamW moments and the step counter from an optimizer.safetensors file.
  absl::Status LoadOptimizerState(const std::string& path);

  int64_t step() const { return step_; }
  const TrainerOptions& options() const { return options_; }
  LlamaModel& model() { return *model_; }
  const ModelParams& params() const { return model_->params(); }

 private:
  explicit Trainer(const TrainerOptions& options);

  const TrainerOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<TokenDataset> data_;
  ModelParams exp_avg_, exp_avg_sq_;
  std::vector<int32_t> inputs_, targets_;
  int64_t step_ = 0;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_TRAINER_H_
