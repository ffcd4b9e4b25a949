#include "worker/engine/optimizer.h"

#include <cmath>

#include "worker/engine/kernels.h"

namespace lumen::engine {

void AdamWUpdate(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t size,
                 const AdamWHyper& h, int64_t step) {
  // Scalars are computed in double (Python floats) and applied in float, as PyTorch does.
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  const float b1 = static_cast<float>(h.beta1);
  const float one_minus_b1 = static_cast<float>(1.0 - h.beta1);
  const float b2 = static_cast<float>(h.beta2);
  const float one_minus_b2 = static_cast<float>(1.0 - h.beta2);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
  const float neg_step_size = static_cast<float>(-(h.lr / bias_correction1));
  const float bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  const float eps = static_cast<float>(h.eps);
  const bool apply_decay = h.weight_decay != 0.0;
  for (int64_t i = 0; i < size; ++i) {
    float p = param[i];
    if (apply_decay) p = p * decay;
    const float g = grad[i];
    float m = exp_avg[i] * b1;
    m = m + one_minus_b1 * g;
    float v = exp_avg_sq[i] * b2;
    v = v + one_minus_b2 * g * g;
    const float denom = std::sqrt(v) / bc2_sqrt + eps;
    p = p + neg_step_size * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p;
  }
}

AdamWHyper AdamWHyperFor(const OptimizerConfig& config, double lr, size_t rank) {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = config.beta1;
  h.beta2 = config.beta2;
  h.eps = config.eps;
  h.weight_decay = rank >= 2 ? config.weight_decay : 0.0;
  return h;
}

double LearningRate(const OptimizerConfig& c, int64_t step, int64_t total_steps) {
  if (step < c.warmup_steps) {
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  }
  if (c.schedule == ScheduleKind::kConstant) return c.lr;
  const double span = static_cast<double>(total_steps - c.warmup_steps);
  if (span <= 0) return c.min_lr;
  double progress = static_cast<double>(step - c.warmup_steps) / span;
  if (progress > 1.0) progress = 1.0;
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

double GlobalGradNorm(const std::vector<std::pair<const float*, int64_t>>& grads) {
  double total = 0;
  for (const auto& [g, n] : grads) {
    const float* t = g;
    total += kernels::LaneSum(n, [t](int64_t i) { return static_cast<double>(t[i]) * t[i]; });
  }
  return std::sqrt(total);
}

double ClipGradNorm(const std::vector<std::pair<float*, int64_t>>& grads, double max_norm) {
  std::vector<std::pair<const float*, int64_t>> views;
  views.reserve(grads.size());
  for (const auto& [g, n] : grads) views.emplace_back(g, n);
  const double norm = GlobalGradNorm(views);
  if (max_norm <= 0) return norm;
  const double clip_coef = max_norm / (norm + 1e-6);
  if (clip_coef < 1.0) {
    const float c = static_cast<float>(clip_coef);
    for (const auto& [g, n] : grads) {
      for (int64_t i = 0; i < n; ++i) g[i] *= c;
    }
  }
  return norm;
}

}  // namespace lumen::engine
