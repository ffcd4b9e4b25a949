#include "worker/device_profile.h"

#include <cblas.h>

#include <algorithm>
#include <time.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/engine/layer_rate.h"
#include "worker/memstore_tensor_home.h"

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

// The engine's decoder-layer rate at hidden size h (head dim 64, intermediate 11h/4), 256
// tokens.
absl::StatusOr<double> DecoderRate(int64_t h, int threads) {
  engine::ModelConfig c;
  c.hidden_size = h;
  c.intermediate_size = (h * 11 / 4 + 7) / 8 * 8;
  c.num_attention_heads = std::max<int64_t>(1, h / 64);
  c.num_key_value_heads = c.num_attention_heads;
  c.vocab_size = 256;
  return engine::MeasureDecoderLayerFlops(c, 256, threads);
}

}  // namespace

double ProcessCpuSeconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

absl::StatusOr<ProfileFigures> MeasureMemstoreCall(MemstoreClient* memstore,
                                                   const std::string& worker) {
  MemstoreTensorHome home(memstore, worker + "/");
  std::vector<float> data(256, 1.0f);
  constexpr int kCalls = 200;
  absl::Status status = home.Put("profile", data.data(), 256, engine::HomeTier::kHost);
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = ProcessCpuSeconds();
  for (int i = 0; i < kCalls && status.ok(); ++i) {
    status = home.Put("profile", data.data(), 256, engine::HomeTier::kHost);
    if (status.ok()) status = home.Get("profile", data.data(), 256);
  }
  const double cpu = ProcessCpuSeconds() - cpu0;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const absl::Status freed = home.FreeAll();
  if (!status.ok()) return status;
  if (!freed.ok()) return freed;
  const double wall = seconds / (2 * kCalls);
  return ProfileFigures{{"memstore_call_seconds", wall},
                        {"memstore_call_cpu_seconds", std::min(wall, 2 * cpu / (2 * kCalls))}};
}

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
  ProfileFigures figures{{"fp32_gemm_flops", 2.0 * kN * kN * kN / gemm_s},
                         {"copy_bytes_per_s", kBytes / copy_s},
                         {"threads", static_cast<double>(std::max(1, threads))}};
  for (int h : kProfiledHiddenSizes) {
    absl::StatusOr<double> rate = DecoderRate(h, threads);
    if (!rate.ok()) return rate.status();
    figures[absl::StrCat("decoder_flops_per_s_h", h)] = *rate;
  }
  return figures;
}

}  // namespace lumen
