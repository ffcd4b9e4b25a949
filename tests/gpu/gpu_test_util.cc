#include "tests/gpu/gpu_test_util.h"

#include <cmath>

#include "worker/cuda/device.h"

namespace lumen::gpu_test {

std::vector<float> RandomBf16Values(int64_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = RoundBf16(dist(rng));
  return v;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = ToBf16(v[i]);
  return out;
}

std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FromBf16(v[i]);
  return out;
}

double NormwiseError(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double err = 0, ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (std::isnan(d)) return NAN;  // fails every EXPECT_LE against a tolerance
    err = std::max(err, d);
    ref = std::max(ref, std::fabs(static_cast<double>(want[i])));
  }
  if (ref == 0) return err;
  return err / ref;
}

void InitParams(const engine::ModelConfig& config, uint64_t seed, engine::ModelParams* params) {
  *params = engine::AllocateParams<float>(config);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, config.init_std);
  for (auto& t : engine::NamedTensors(config, params)) {
    if (t.shape.size() == 1) {
      std::fill(t.data->begin(), t.data->end(), 1.0f);
    } else {
      for (float& x : *t.data) x = static_cast<float>(dist(rng));
    }
  }
}

std::vector<int32_t> PatternTokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> toks(n);
  for (int64_t i = 0; i < n; ++i) {
    toks[i] = static_cast<int32_t>(rng() % 4 == 0 ? rng() % vocab : (i * 7) % vocab);
  }
  return toks;
}

int GpuCount(std::string* why) { return cuda::DeviceCount(why); }

}  // namespace lumen::gpu_test
