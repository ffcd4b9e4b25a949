// Offload efficiency on the CPU device (issue 5's "Efficiency" benchmark): the same job trained
// resident and with its training state >= 20x the device budget, all under the link model set
// to an RTX 4090's FLOPs-per-PCIe-byte ratio (measured sgemm FLOP/s ÷ 6,600 = link bytes/s per
// direction). The offloaded job runs twice: scheduled (reads prefetched from the first step's
// trace, writes behind compute, AdamW on the host next to the data, during the next step's
// forward or with --overlap_backward=1 during the backward) and on demand (every read
// waits at the op that needs it, AdamW on the device through the link), to show what the
// schedule buys. Prints one JSON object: tokens/s of each, ratios to resident, device busy
// fraction (compute time ÷ wall time), stalls by cause, prefetch hit rate and the targets.
// Wall time covers the measured steps and the optimizer updates still in flight after them.
//
//   bazel run -c opt //tests/bench:offload_bench [-- --steps=3 --accum=16]
//
// The efficiency target is met with GPU-shaped layers and a batch large enough that the
// forward pass does more than 6,600 FLOPs per byte of parameters it reads (2 x tokens / 4 B):
//   bazel run -c opt //tests/bench:offload_bench -- --layers=24 --hidden=1024 --batch=2 \
//       --accum=28 --steps=1 --on_demand=0          (about 17 minutes on 2 cores)
// At the default hidden 256 a layer does 1,536 FLOPs per checkpoint byte it writes and the
// link binds whatever the schedule does (docs/performance.md).
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

#include "absl/strings/str_cat.h"
#include "coordinator/planner/model_desc.h"
#include "coordinator/planner/planner.h"
#include "coordinator/planner/report.h"
#include "worker/engine/layer_rate.h"
#include "worker/engine/offload_trainer.h"
#include "worker/engine/optimizer.h"
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

// AdamW parameter updates per second on one thread (the host optimizer's thread).
double AdamWParamsPerSecond() {
  constexpr int64_t n = int64_t{1} << 22;
  std::vector<float> p(n, 0.5f), g(n, 0.01f), m(n, 0.0f), v(n, 0.0f);
  lumen::engine::AdamWHyper hyper;
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    lumen::engine::AdamWUpdate(p.data(), g.data(), m.data(), v.data(), n, hyper, i + 1);
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return n / best;
}

double CopyBytesPerSecond() {
  constexpr size_t kBytes = 64 << 20;
  std::vector<char> src(kBytes, 1), dst(kBytes, 0);
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    std::copy(src.begin(), src.end(), dst.begin());
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return kBytes / best;
}

// The batch the planner picks (issue 5: "at a batch the planner picks"): the fewest
// accumulation steps at which the plan for this machine predicts the offloaded job at the
// target share of the resident job's speed and the device busy at least the target. The
// machine as the planner sees it: the CPU device training this model's layers at `layer_flops`
// (measured at this shape), memory budget state ÷ oversubscription, the link model, host
// memory at memcpy speed and AdamW at its measured one-thread rate, no NVMe.
struct PlannerPick {
  long accum = 0;  // 0: none up to kMaxAccum reaches the targets
  double predicted_ratio = 0, predicted_busy = 0;
};
constexpr long kMaxAccum = 128;

PlannerPick PickAccum(lumen::engine::TrainerOptions o, double layer_flops, double link,
                      double copy, double adamw, long oversubscription, long only_accum) {
  lumen::HardwareProfile hw;
  hw.name = "cpu-bench";
  hw.source = "measured by offload_bench";
  hw.device.kind = "cpu";
  hw.device.count = 1;
  hw.device.usable_memory_fraction = 1.0;
  hw.device.peak_fp32_flops = hw.device.peak_bf16_flops = layer_flops;
  hw.device.memory_bandwidth = copy;
  hw.device.link_peak = link;
  hw.device.shares_host_cpu = true;
  hw.host.memory_bytes = int64_t{1} << 40;
  hw.host.usable_memory_fraction = 1.0;
  hw.host.memory_peak = copy;
  hw.host.cpu_optimizer_params_per_s = adamw;
  PlannerPick pick;
  for (long accum = only_accum > 0 ? only_accum : 1;
       accum <= (only_accum > 0 ? only_accum : kMaxAccum); ++accum) {
    o.train.grad_accum_steps = accum;
    auto needs = lumen::engine::OffloadTrainer::Requirements(o);
    if (!needs.ok()) break;
    const lumen::engine::ModelConfig& c = o.model;
    auto spec = lumen::ParseJobSpecForPlanning(absl::StrCat(
        "model: {hidden_size: ", c.hidden_size, ", intermediate_size: ", c.intermediate_size,
        ", num_hidden_layers: ", c.num_hidden_layers, ", num_attention_heads: ",
        c.num_attention_heads, ", num_key_value_heads: ", c.num_key_value_heads,
        ", vocab_size: ", c.vocab_size, ", max_position_embeddings: ", o.train.seq_len,
        "}\ntrain: {seq_len: ", o.train.seq_len, ", micro_batch_size: ", o.train.micro_batch_size,
        ", grad_accum_steps: ", accum, "}\nresources: {precision: fp32}\n"));
    if (!spec.ok()) {
      std::fprintf(stderr, "planner: %s\n", spec.status().ToString().c_str());
      break;
    }
    const lumen::ModelDesc m = lumen::DescribeModel(*spec);
    double step[2] = {0, 0}, busy = 0;
    bool fits = true;
    for (int offloaded = 0; offloaded < 2 && fits; ++offloaded) {
      const int64_t budget =
          offloaded ? needs->training_state_bytes() / oversubscription : int64_t{1} << 40;
      hw.device.memory_bytes = budget;
      lumen::PlannerOptions opt;
      opt.groups = 1;
      opt.device_budget_bytes = budget;
      auto plan = lumen::PlanJob(m, hw, opt);
      fits = plan.ok() && plan->fits;
      if (!fits) break;
      step[offloaded] = plan->sim.step_time_s;
      busy = plan->sim.device_busy_fraction;
      if (only_accum > 0) {
        std::fprintf(stderr, "%s\n",
                     lumen::PlanText(offloaded ? "offloaded" : "resident", m, hw, *plan).c_str());
      }
    }
    if (!fits) continue;
    pick.predicted_ratio = step[0] / step[1];
    pick.predicted_busy = busy;
    if (only_accum > 0 || (pick.predicted_ratio >= kTargetRatio && busy >= kTargetBusy)) {
      pick.accum = accum;
      return pick;
    }
  }
  return pick;
}

struct Run {
  double tokens_per_s = 0;
  double busy = 0;
  double stall_transfer = 0, stall_optimizer = 0, stall_memory = 0;
  double hit_rate = 0;
  double link_in_seconds = 0, link_out_seconds = 0, seconds = 0;
  int64_t budget = 0, state = 0, peak = 0, bytes_in = 0, bytes_out = 0;
  std::vector<double> losses;
};

bool Train(const lumen::engine::TrainerOptions& o, int64_t budget, double link_bytes_per_s,
           bool scheduled, bool overlap_backward, int warmup, int steps, Run* out) {
  lumen::engine::MemoryTensorHome memory;
  lumen::engine::ThrottledTensorHome link(&memory, link_bytes_per_s);
  lumen::engine::OffloadOptions offload;
  offload.device_budget_bytes = budget;
  offload.home = &link;
  offload.host_home = &memory;
  offload.prefetch = scheduled;
  offload.host_optimizer = scheduled;
  offload.overlap_optimizer = overlap_backward;
  auto trainer = lumen::engine::OffloadTrainer::Create(o, offload);
  if (!trainer.ok()) {
    std::fprintf(stderr, "%s\n", trainer.status().ToString().c_str());
    return false;
  }
  out->budget = budget;
  out->state = (*trainer)->TrainingStateBytes();
  double compute = 0, tokens = 0, reads = 0, hits = 0;
  auto start = std::chrono::steady_clock::now();
  double in0 = 0, out0 = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    auto r = (*trainer)->Step();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return false;
    }
    out->losses.push_back(r->loss);
    std::fprintf(stderr, "  step %d: %.1f s, busy %.2f, stalls transfer %.1f s optimizer %.1f s "
                 "memory %.1f s, reads %ld (%ld prefetched in time)\n", s, r->step_time_s,
                 r->device_busy_fraction(), r->stall_transfer_seconds, r->stall_optimizer_seconds,
                 r->stall_memory_seconds, static_cast<long>(r->home_reads),
                 static_cast<long>(r->prefetch_hits));
    if (s + 1 == warmup) {
      // Measure from here: the warm-up step's optimizer updates may still be running.
      start = std::chrono::steady_clock::now();
      in0 = link.home_to_device_seconds();
      out0 = link.device_to_home_seconds();
    }
    if (s < warmup) continue;
    compute += r->compute_seconds;
    out->stall_transfer += r->stall_transfer_seconds;
    out->stall_optimizer += r->stall_optimizer_seconds;
    out->stall_memory += r->stall_memory_seconds;
    reads += r->home_reads;
    hits += r->prefetch_hits;
    tokens += r->tokens;
    out->bytes_in += r->bytes_home_to_device;
    out->bytes_out += r->bytes_device_to_home;
    out->peak = std::max(out->peak, r->device_memory_peak_bytes);
  }
  if (absl::Status s = (*trainer)->Flush(); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return false;
  }
  out->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out->link_in_seconds = link.home_to_device_seconds() - in0;
  out->link_out_seconds = link.device_to_home_seconds() - out0;
  out->tokens_per_s = tokens / out->seconds;
  out->busy = compute / out->seconds;
  out->hit_rate = reads > 0 ? hits / reads : 1.0;
  return true;
}

void PrintRun(const char* name, const Run& r, double resident_tokens_per_s) {
  std::printf(
      "\"%s\":{\"tokens_per_s\":%.1f,\"ratio_to_resident\":%.3f,\"device_busy_fraction\":%.3f,"
      "\"stall_seconds\":{\"transfer\":%.2f,\"optimizer\":%.2f,\"memory\":%.2f},"
      "\"prefetch_hit_rate\":%.3f,\"bytes_home_to_device\":%ld,\"bytes_device_to_home\":%ld,"
      "\"link_busy_fraction\":{\"home_to_device\":%.3f,\"device_to_home\":%.3f},"
      "\"device_memory_peak_bytes\":%ld,\"seconds\":%.1f}",
      name, r.tokens_per_s, r.tokens_per_s / resident_tokens_per_s, r.busy, r.stall_transfer,
      r.stall_optimizer, r.stall_memory, r.hit_rate, static_cast<long>(r.bytes_in),
      static_cast<long>(r.bytes_out), r.link_in_seconds / r.seconds,
      r.link_out_seconds / r.seconds, static_cast<long>(r.peak), r.seconds);
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, long> flags = {{"layers", 16}, {"hidden", 256}, {"seq", 256},
                                       {"batch", 8},   {"accum", 16},   {"steps", 2},
                                       {"warmup", 1},  {"threads", 2},  {"oversubscription", 20},
                                       {"on_demand", 1}, {"link_scale", 1}, {"plan_only", 0},
                                       {"overlap_backward", 0}};
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
  // --link_scale multiplies the modelled link (100 = practically no link), to separate the
  // link's cost from the schedule's own.
  const double link = flops / kFlopsPerLinkByte * static_cast<double>(flags["link_scale"]);
  auto layer_flops = lumen::engine::MeasureDecoderLayerFlops(
      o.model, flags["seq"] * flags["batch"], static_cast<int>(flags["threads"]));
  if (!layer_flops.ok()) {
    std::fprintf(stderr, "%s\n", layer_flops.status().ToString().c_str());
    return 1;
  }
  const PlannerPick pick =
      PickAccum(o, *layer_flops, link, CopyBytesPerSecond(), AdamWParamsPerSecond(),
                flags["oversubscription"], flags["plan_only"] != 0 ? flags["accum"] : 0);
  if (flags["plan_only"] != 0) {
    std::printf("{\"grad_accum_steps\":%ld,\"predicted_ratio\":%.3f,\"predicted_busy\":%.3f}\n",
                flags["accum"], pick.predicted_ratio, pick.predicted_busy);
    return 0;
  }
  std::fprintf(stderr, "planner: decoder layer %.3g FLOP/s; picks grad_accum_steps %ld "
               "(predicted ratio %.3f, busy %.3f)\n", *layer_flops, pick.accum,
               pick.predicted_ratio, pick.predicted_busy);
  if (flags["accum"] == 0) {
    if (pick.accum == 0) {
      std::fprintf(stderr, "the planner predicts no accumulation up to %ld meets the targets; "
                   "pass --accum=N\n", kMaxAccum);
      return 1;
    }
    o.train.grad_accum_steps = pick.accum;
    flags["accum"] = pick.accum;
  }
  Run resident, scheduled, on_demand;
  std::fprintf(stderr, "resident:\n");
  const bool overlap = flags["overlap_backward"] != 0;
  if (!Train(o, int64_t{1} << 40, link, true, overlap, flags["warmup"], flags["steps"],
             &resident)) {
    return 1;
  }
  const int64_t budget = resident.state / flags["oversubscription"];
  std::fprintf(stderr, "offloaded, scheduled:\n");
  if (!Train(o, budget, link, true, overlap, flags["warmup"], flags["steps"], &scheduled)) {
    return 1;
  }
  if (flags["on_demand"] != 0) {
    std::fprintf(stderr, "offloaded, on demand:\n");
    if (!Train(o, budget, link, false, false, flags["warmup"], flags["steps"], &on_demand)) {
      return 1;
    }
  }
  const double ratio = scheduled.tokens_per_s / resident.tokens_per_s;
  std::printf(
      "{\"benchmark\":\"offload_efficiency\",\"sgemm_flops\":%.4g,\"flops_per_link_byte\":%.0f,"
      "\"link_bytes_per_s\":%.4g,\"model\":{\"layers\":%ld,\"hidden\":%ld,\"seq\":%ld},"
      "\"tokens_per_step\":%ld,\"training_state_bytes\":%ld,\"device_budget_bytes\":%ld,"
      "\"oversubscription\":%.1f,\"planner\":{\"decoder_layer_flops\":%.4g,\"grad_accum_steps\":%ld,"
      "\"predicted_ratio\":%.3f,\"predicted_busy\":%.3f},\"grad_accum_steps\":%ld,"
      "\"optimizer_overlap\":\"%s\","
      "\"resident\":{\"tokens_per_s\":%.1f,\"seconds\":%.1f},",
      flops, kFlopsPerLinkByte, link, flags["layers"], flags["hidden"], flags["seq"],
      flags["seq"] * flags["batch"] * flags["accum"], (long)resident.state, (long)budget,
      static_cast<double>(resident.state) / budget, *layer_flops, pick.accum,
      pick.predicted_ratio, pick.predicted_busy, flags["accum"], overlap ? "backward" : "forward",
      resident.tokens_per_s,
      resident.seconds);
  PrintRun("scheduled", scheduled, resident.tokens_per_s);
  if (flags["on_demand"] != 0) {
    std::printf(",");
    PrintRun("on_demand", on_demand, resident.tokens_per_s);
  }
  std::printf(
      ",\"ratio\":%.3f,\"target_ratio\":%.2f,\"device_busy_fraction\":%.3f,"
      "\"target_busy\":%.2f,\"meets_target\":%s,\"same_losses\":%s}\n",
      ratio, kTargetRatio, scheduled.busy, kTargetBusy,
      ratio >= kTargetRatio && scheduled.busy >= kTargetBusy ? "true" : "false",
      resident.losses == scheduled.losses &&
              (flags["on_demand"] == 0 || resident.losses == on_demand.losses)
          ? "true"
          : "false");
  std::filesystem::remove_all(dir);
  return 0;
}
