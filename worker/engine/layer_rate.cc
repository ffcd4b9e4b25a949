#include "worker/engine/layer_rate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "common/status_macros.h"
#include "worker/engine/thread_pool.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {

absl::StatusOr<double> MeasureDecoderLayerFlops(ModelConfig config, int64_t seq_len,
                                                int threads) {
  const int64_t h = config.hidden_size;
  const double kv = static_cast<double>(config.num_key_value_heads * config.head_dim());
  const double matmul =
      2.0 * h * h + 2.0 * h * kv + 3.0 * h * static_cast<double>(config.intermediate_size);
  // A training step runs layer after layer, so a layer's weights are not in the CPU's cache
  // when it starts: cycle through enough layers to hold more than a large last-level cache.
  constexpr double kCacheBytes = 32 << 20;
  const int layers = static_cast<int>(std::clamp(std::ceil(kCacheBytes / (4 * matmul)), 1.0, 8.0));
  config.num_hidden_layers = layers;
  config.max_position_embeddings = std::max(config.max_position_embeddings, seq_len);
  ThreadPool pool(std::max(1, threads));
  LlamaModel model(config, true, &pool);
  InitParams(config, 1, &model.params());
  std::vector<float> x(seq_len * h), y(seq_len * h), dy(seq_len * h), dx(seq_len * h);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97);
  // The median of three runs: what a training step sustains, neither the first run's cold
  // start nor the best moment of a busy machine (the benchmarks that check predictions compare
  // medians too).
  std::vector<double> seconds;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      RETURN_IF_ERROR(model.DecoderLayerForward(l, x.data(), y.data(), 1, seq_len));
    }
    for (int l = layers - 1; l >= 0; --l) {
      std::copy(y.begin(), y.end(), dy.begin());
      RETURN_IF_ERROR(model.DecoderLayerBackward(l, x.data(), dy.data(), dx.data(), 1, seq_len));
    }
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers);
  }
  std::nth_element(seconds.begin(), seconds.begin() + seconds.size() / 2, seconds.end());
  const double per_token = 4 * (2 * matmul + 2.0 * static_cast<double>(seq_len) * h);
  return per_token * static_cast<double>(seq_len) / seconds[seconds.size() / 2];
}

}  // namespace lumen::engine
