// Helpers of the GPU tests: bf16 rounding on the host, random inputs, normwise comparison
// against the CPU reference, deterministic model initialisation, and the "no GPU: skip" check.
// Test-only; thread-compatible.
#ifndef LUMEN_TESTS_GPU_GPU_TEST_UTIL_H_
#define LUMEN_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "worker/engine/model.h"

namespace lumen::gpu_test {

// Round-to-nearest-even float -> bf16 bits, and back.
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float FromBf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float RoundBf16(float f) { return FromBf16(ToBf16(f)); }

// n values ~ N(0, stddev), rounded to bf16 so that CPU and GPU see identical inputs.
std::vector<float> RandomBf16Values(int64_t n, float stddev, uint64_t seed);
std::vector<uint16_t> ToBf16(const std::vector<float>& v);
std::vector<float> FromBf16(const std::vector<uint16_t>& v);

// max |got - want| / max |want| (0 when both are all zeros); NaN when any difference is NaN,
// infinity when the sizes differ.
double NormwiseError(const std::vector<float>& got, const std::vector<float>& want);

// Matrices ~ N(0, init_std) from mt19937_64(seed) in NamedTensors order, norms 1.
void InitParams(const engine::ModelConfig& config, uint64_t seed, engine::ModelParams* params);

// Token ids with a learnable pattern and noise, the same for the same arguments.
std::vector<int32_t> PatternTokens(int64_t n, int64_t vocab, uint64_t seed);

// Number of usable CUDA devices; when 0, `why` says why. Never fails.
int GpuCount(std::string* why);

}  // namespace lumen::gpu_test

#endif  // LUMEN_TESTS_GPU_GPU_TEST_UTIL_H_
