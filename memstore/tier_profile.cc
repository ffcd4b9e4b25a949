#include "memstore/tier_profile.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/optimizer.h"

namespace lumen {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

absl::StatusOr<ProfileFigures> MeasureTiers(const std::vector<NvmeDir>& dirs, NvmeIo& io) {
  ProfileFigures figures;
  constexpr size_t kBytes = 64 << 20;
  void* raw = nullptr;
  if (posix_memalign(&raw, 4096, 2 * kBytes) != 0) {
    return absl::ResourceExhaustedError("cannot allocate the profiling buffer");
  }
  std::unique_ptr<char, decltype(&free)> buffer(static_cast<char*>(raw), &free);
  memset(buffer.get(), 7, 2 * kBytes);  // pre-fault
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    memcpy(buffer.get() + kBytes, buffer.get(), kBytes);
    best = std::min(best, Seconds(t0));
  }
  figures["host_copy_bytes_per_s"] = kBytes / best;

  for (size_t d = 0; d < dirs.size(); ++d) {
    std::error_code ec;
    std::filesystem::create_directories(dirs[d].path, ec);
    const std::string path = (std::filesystem::path(dirs[d].path) / "profile.tmp").string();
    const std::vector<IoSegment> segments = {{0, buffer.get(), kBytes}};
    auto t0 = std::chrono::steady_clock::now();
    absl::Status written = io.Write(path, segments);
    const double write_s = Seconds(t0);
    if (!written.ok()) {
      (void)io.Remove(path);
      return absl::Status(written.code(), absl::StrCat("profiling --nvme-dir ", dirs[d].path,
                                                       ": ", written.message()));
    }
    t0 = std::chrono::steady_clock::now();
    absl::Status read = io.Read(path, segments);
    const double read_s = Seconds(t0);
    (void)io.Remove(path);
    RETURN_IF_ERROR(read);
    figures[absl::StrCat("nvme", d, "_write_bytes_per_s")] = kBytes / write_s;
    figures[absl::StrCat("nvme", d, "_read_bytes_per_s")] = kBytes / read_s;
  }

  constexpr int64_t kParams = 4 << 20;
  std::vector<float> p(kParams, 0.1f), g(kParams, 0.01f), m(kParams, 0.0f), v(kParams, 0.0f);
  engine::AdamWHyper hyper;
  hyper.weight_decay = 0.1;
  best = 1e30;
  for (int step = 1; step <= 3; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    engine::AdamWUpdate(p.data(), g.data(), m.data(), v.data(), kParams, hyper, step);
    best = std::min(best, Seconds(t0));
  }
  figures["optimizer_params_per_s"] = kParams / best;
  return figures;
}

}  // namespace lumen
