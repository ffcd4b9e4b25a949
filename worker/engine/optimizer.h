// AdamW exactly as torch.optim.AdamW (PyTorch 1.13, single-tensor path), gradient clipping as
// torch.nn.utils.clip_grad_norm_, and the warmup + constant/cosine learning-rate schedule of
// DESIGN.md §7. Free functions; thread-safe as long as callers do not share output buffers.
#ifndef LUMEN_WORKER_ENGINE_OPTIMIZER_H_
#define LUMEN_WORKER_ENGINE_OPTIMIZER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lumen::engine {

enum class ScheduleKind { kConstant, kCosine };

struct OptimizerConfig {
  double lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  // Decoupled weight decay; applied only to tensors with 2+ dimensions.
  double weight_decay = 0.1;
  // Max global gradient norm; 0 turns clipping off.
  double grad_clip = 1.0;
  ScheduleKind schedule = ScheduleKind::kCosine;
  // lr * (s + 1) / warmup_steps for steps s < warmup_steps.
  int64_t warmup_steps = 0;
  // Cosine floor.
  double min_lr = 0.0;
};

// Hyperparameters of one AdamW update of one tensor.
struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // pass 0 for tensors that get no decay
};

// The hyperparameters of `config` at learning rate `lr` for a tensor of `rank` dimensions:
// matrices (rank >= 2) get weight decay, vectors (norms) do not.
AdamWHyper AdamWHyperFor(const OptimizerConfig& config, double lr, size_t rank);

// One AdamW update of `size` elements; `step` is the 1-based update count (bias correction).
// Per element, in float like PyTorch:
//   p *= 1 - lr*wd;  m = m*b1 + (1-b1)*g;  v = v*b2 + (1-b2)*g*g;
//   denom = sqrt(v) / sqrt(1 - b2^step) + eps;  p += (-lr / (1 - b1^step)) * m / denom.
// Elementwise and independent of threading; the caller may split a tensor into ranges.
void AdamWUpdate(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t size,
                 const AdamWHyper& hyper, int64_t step);

// Learning rate at 0-based step s of total_steps.
double LearningRate(const OptimizerConfig& config, int64_t step, int64_t total_steps);

// Global L2 norm over all `grads` (sum of squares in double, tensors in order, elements in
// order); deterministic.
double GlobalGradNorm(const std::vector<std::pair<const float*, int64_t>>& grads);

// clip_grad_norm_: with clip_coef = max_norm / (total_norm + 1e-6), multiplies every gradient
// by clip_coef when clip_coef < 1. Returns the norm before clipping. max_norm <= 0: no clipping.
double ClipGradNorm(const std::vector<std::pair<float*, int64_t>>& grads, double max_norm);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_OPTIMIZER_H_
