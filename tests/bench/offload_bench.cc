// Offload efficiency on the CPU device (issue 5's "Efficiency" benchmark, first version): the
// same job trained resident and with its training state >= 20x the device budget, both under
// the link model set to an RTX 4090's FLOPs-per-PCIe-byte ratio (measured sgemm FLOP/s ÷
// 6,600 = link bytes/s). Prints one JSON object with both tokens/s, their ratio, the device
// busy fraction (time not waiting for the link ÷ step time) and the targets.
//
// Today's offloaded path fetches on demand (one op at a time, no prefetch), so this measures
// what prefetching will have to win back.
//
//   bazel run -c opt //tests/bench:offload_bench [-- --steps=3 --accum=16]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "worker/engine/offload_trainer.h"
#include "worker/engine/tensor_home.h"

namespace {

constexpr double kFlopsPerLinkByte = 6600;  // RTX 4090: 165 TFLOP/s over ~25 GB/s PCIe
constexpr double kTargetRatio = 0.90;
constexpr double kTargetBusy = 0.85;

double SgemmFlops() {
  constexpr int n = 1024;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a.data(), n, b.data(), n,
                0, c.data(), n);
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * n * n * n / best;
}

struct Run {
  double tokens_per_s = 0;
  double busy = 0;
  int64_t budget = 0, state = 0, peak = 0;
  double loss = 0;
};

bool Train(const lumen::engine::TrainerOptions& o, int64_t budget, double link_bytes_per_s,
           int warmup, int steps, Run* out) {
  lumen::engine::MemoryTensorHome memory;
  lumen::engine::ThrottledTensorHome link(&memory, link_bytes_per_s);
  lumen::engine::OffloadOptions offload;
  offload.device_budget_bytes = budget;
  offload.home = &link;
  auto trainer = lumen::engine::OffloadTrainer::Create(o, offload);
  if (!trainer.ok()) {
    std::fprintf(stderr, "%s\n", trainer.status().ToString().c_str());
    return false;
  }
  out->budget = budget;
  out->state = (*trainer)->TrainingStateBytes();
  double seconds = 0, link_seconds = 0, tokens = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    const double link_before = link.device_to_home_seconds() + link.home_to_device_seconds();
    auto r = (*trainer)->Step();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return false;
    }
    if (s < warmup) continue;
    seconds += r->step_time_s;
    link_seconds += link.device_to_home_seconds() + link.home_to_device_seconds() - link_before;
    tokens += r->tokens;
    out->peak = std::max(out->peak, r->device_memory_peak_bytes);
    out->loss = r->loss;
  }
  out->tokens_per_s = tokens / seconds;
  out->busy = 1.0 - std::min(1.0, link_seconds / seconds);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, long> flags = {{"layers", 16}, {"hidden", 256}, {"seq", 256},
                                       {"batch", 8},   {"accum", 16},   {"steps", 2},
                                       {"warmup", 1},  {"threads", 2},  {"oversubscription", 20}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos || !flags.count(a.substr(2, eq - 2))) {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
    flags[a.substr(2, eq - 2)] = std::atol(a.c_str() + eq + 1);
  }
  const std::string dir = std::filesystem::temp_directory_path() / "lumen-offload-bench";
  std::filesystem::create_directories(dir);
  const std::string data = dir + "/tokens.bin";
  {
    std::mt19937 rng(1);
    std::vector<uint16_t> tokens(1 << 21);
    for (auto& t : tokens) t = rng() % 256;
    std::ofstream(data, std::ios::binary)
        .write(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  }
  lumen::engine::TrainerOptions o;
  o.model.num_hidden_layers = flags["layers"];
  o.model.hidden_size = flags["hidden"];
  o.model.num_attention_heads = 4;
  o.model.num_key_value_heads = 4;
  o.model.intermediate_size = flags["hidden"] * 8 / 3 / 8 * 8;
  o.model.vocab_size = 256;
  o.model.max_position_embeddings = flags["seq"];
  o.train.seq_len = flags["seq"];
  o.train.micro_batch_size = flags["batch"];
  o.train.grad_accum_steps = flags["accum"];
  o.train.steps = flags["warmup"] + flags["steps"];
  o.optimizer.schedule = lumen::engine::ScheduleKind::kConstant;
  o.num_threads = static_cast<int>(flags["threads"]);
  o.data.path = data;

  openblas_set_num_threads(static_cast<int>(flags["threads"]));
  const double flops = SgemmFlops();
  const double link = flops / kFlopsPerLinkByte;
  Run resident, offloaded;
  if (!Train(o, int64_t{1} << 40, link, flags["warmup"], flags["steps"], &resident)) return 1;
  const int64_t budget = resident.state / flags["oversubscription"];
  if (!Train(o, budget, link, flags["warmup"], flags["steps"], &offloaded)) return 1;
  const double ratio = offloaded.tokens_per_s / resident.tokens_per_s;
  std::printf(
      "{\"benchmark\":\"offload_efficiency\",\"mode\":\"on_demand\",\"prefetch\":false,"
      "\"sgemm_flops\":%.4g,\"link_bytes_per_s\":%.4g,\"tokens_per_step\":%ld,"
      "\"training_state_bytes\":%ld,\"device_budget_bytes\":%ld,\"oversubscription\":%.1f,"
      "\"device_memory_peak_bytes\":%ld,\"resident_tokens_per_s\":%.1f,"
      "\"offloaded_tokens_per_s\":%.1f,\"ratio\":%.3f,\"target_ratio\":%.2f,"
      "\"device_busy_fraction\":%.3f,\"target_busy\":%.2f,\"meets_target\":%s,"
      "\"same_loss\":%s}\n",
      flops, link, flags["seq"] * flags["batch"] * flags["accum"], (long)resident.state,
      (long)budget, static_cast<double>(resident.state) / budget, (long)offloaded.peak,
      resident.tokens_per_s, offloaded.tokens_per_s, ratio, kTargetRatio, offloaded.busy,
      kTargetBusy, ratio >= kTargetRatio && offloaded.busy >= kTargetBusy ? "true" : "false",
      resident.loss == offloaded.loss ? "true" : "false");
  std::filesystem::remove_all(dir);
  return 0;
}
