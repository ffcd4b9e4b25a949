#include "worker/device_profile.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace lumen {
namespace {

template <typename F>
double BestSeconds(int reps, F&& f) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                              .count());
  }
  return best;
}

}  // namespace

absl::StatusOr<ProfileFigures> MeasureCpuDevice(int threads) {
  constexpr int kN = 1024;
  std::vector<float> a(kN * kN, 0.5f), b(kN * kN, 0.25f), c(kN * kN, 0.0f);
  openblas_set_num_threads(std::max(1, threads));
  const double gemm_s = BestSeconds(3, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kN, kN, kN, 1.0f, a.data(), kN,
                b.data(), kN, 0.0f, c.data(), kN);
  });
  if (c[0] != 0.5f * 0.25f * kN) return absl::InternalError("sgemm gave a wrong result");
  constexpr size_t kBytes = 64 << 20;
  std::vector<char> src(kBytes, 1), dst(kBytes, 0);  // value-initialised: pre-faulted
  const double copy_s = BestSeconds(3, [&] { memcpy(dst.data(), src.data(), kBytes); });
  return ProfileFigures{{"fp32_gemm_flops", 2.0 * kN * kN * kN / gemm_s},
                        {"copy_bytes_per_s", kBytes / copy_s},
                        {"threads", static_cast<double>(std::max(1, threads))}};
}

}  // namespace lumen
