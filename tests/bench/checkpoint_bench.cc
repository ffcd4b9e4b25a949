// Host memory a checkpoint costs: an offloaded OffloadTrainer exports its state streamed, a
// tensor at a time (OffloadTrainer::Export), against the whole-state gather that checkpoints
// used before (GatherParams + GatherOptimizerState, then the in-memory writers), in the same
// run. Likewise starting: the transient memory Create takes beyond the state it leaves in the
// home, random weights made a tensor at a time (engine::RandomWeights), against making them
// whole first (InitParams, the way Create used to). Peak resident memory is read from
// /proc/self/status (VmHWM, reset through /proc/self/clear_refs before each). Prints one JSON
// line.
//   bazel run -c opt //tests/bench:checkpoint_bench -- --layers=8 --hidden=1024
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/offload_trainer.h"
#include "worker/engine/trainer.h"

namespace {

using lumen::engine::ModelParams;

// VmRSS / VmHWM in bytes.
int64_t StatusBytes(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::atoll(line.c_str() + std::strlen(key)) * 1024;
  }
  return -1;
}

// Resets VmHWM to the current RSS.
void ResetPeak() { std::ofstream("/proc/self/clear_refs") << "5"; }

int64_t Flag(int argc, char** argv, const std::string& name, int64_t def) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]).rfind(prefix, 0) == 0) return std::atoll(argv[i] + prefix.size());
  }
  return def;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  lumen::engine::TrainerOptions o;
  o.model.hidden_size = Flag(argc, argv, "hidden", 1024);
  o.model.intermediate_size = o.model.hidden_size * 11 / 4;
  o.model.num_hidden_layers = Flag(argc, argv, "layers", 8);
  o.model.num_attention_heads = o.model.hidden_size / 64;
  o.model.num_key_value_heads = o.model.num_attention_heads;
  o.model.vocab_size = Flag(argc, argv, "vocab", 8192);
  o.model.max_position_embeddings = 64;
  o.optimizer.lr = 1e-3;
  o.train.steps = 1;
  o.train.seq_len = 16;
  o.train.micro_batch_size = 1;
  o.train.grad_accum_steps = 1;
  o.num_threads = 2;
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("checkpoint_bench_", getpid()))
          .string();
  std::filesystem::create_directories(dir);
  {
    std::vector<uint16_t> tokens(4096);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = (i * 7919) % o.model.vocab_size;
    std::ofstream(dir + "/tokens.bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(tokens.data()), 2 * tokens.size());
  }
  o.data.path = dir + "/tokens.bin";
  // The state lives in the home (host memory, as the memstore's host tier would hold it);
  // the device budget is a few layers.
  lumen::engine::MemoryTensorHome home;
  lumen::engine::OffloadOptions off;
  off.home = &home;
  auto probe = lumen::engine::OffloadTrainer::Requirements(o);
  if (!probe.ok()) {
    std::fprintf(stderr, "%s\n", probe.status().ToString().c_str());
    return 1;
  }
  off.device_budget_bytes = 3 * probe->largest_op_bytes;
  ResetPeak();
  auto trainer = lumen::engine::OffloadTrainer::Create(o, off);
  if (!trainer.ok()) {
    std::fprintf(stderr, "%s\n", trainer.status().ToString().c_str());
    return 1;
  }
  // What starting took beyond what stays (the state in the home, the trainer's buffers).
  const int64_t create_transient = StatusBytes("VmHWM:") - StatusBytes("VmRSS:");
  int64_t whole_init = 0;
  {
    ResetPeak();
    const int64_t base = StatusBytes("VmRSS:");
    lumen::engine::ThreadPool pool(o.num_threads);
    ModelParams whole;
    lumen::engine::InitParams(o.model, o.train.seed, &whole, &pool);
    whole_init = StatusBytes("VmHWM:") - base;
  }
  if (auto s = (*trainer)->Step(); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
    return 1;
  }
  const int64_t params = lumen::engine::ParameterCount(o.model);

  ResetPeak();
  const int64_t base_streamed = StatusBytes("VmRSS:");
  auto t0 = std::chrono::steady_clock::now();
  absl::Status s = (*trainer)->Export(dir + "/streamed");
  const double streamed_s = Seconds(t0);
  const int64_t streamed_peak = StatusBytes("VmHWM:") - base_streamed;
  if (!s.ok()) {
    std::fprintf(stderr, "streamed export: %s\n", s.ToString().c_str());
    return 1;
  }

  ResetPeak();
  const int64_t base_whole = StatusBytes("VmRSS:");
  t0 = std::chrono::steady_clock::now();
  {
    auto p = (*trainer)->GatherParams();
    s = p.ok() ? lumen::engine::ExportHfDirectory(dir + "/whole", o.model, *p) : p.status();
  }
  if (s.ok()) {
    ModelParams m, v;
    s = (*trainer)->GatherOptimizerState(&m, &v);
    if (s.ok()) {
      s = lumen::engine::SaveOptimizerState(dir + "/whole/" + lumen::engine::kOptimizerFile,
                                            o.model, m, v, (*trainer)->step());
    }
  }
  const double whole_s = Seconds(t0);
  const int64_t whole_peak = StatusBytes("VmHWM:") - base_whole;
  if (!s.ok()) {
    std::fprintf(stderr, "whole-state export: %s\n", s.ToString().c_str());
    return 1;
  }
  // Both wrote the same bytes.
  auto same = [&](const std::string& f) {
    std::ifstream a(dir + "/streamed/" + f, std::ios::binary), b(dir + "/whole/" + f,
                                                                   std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(a), {}) ==
           std::string(std::istreambuf_iterator<char>(b), {});
  };
  const bool identical = same(lumen::engine::kOptimizerFile) && same("model.safetensors");
  double load1 = 0;
  getloadavg(&load1, 1);
  std::printf(
      "{\"bench\":\"checkpoint_export\",\"parameters\":%ld,\"state_bytes\":%ld,"
      "\"streamed_peak_extra_bytes\":%ld,\"whole_state_peak_extra_bytes\":%ld,"
      "\"streamed_bytes_per_parameter\":%.3f,\"whole_state_bytes_per_parameter\":%.3f,"
      "\"streamed_s\":%.2f,\"whole_state_s\":%.2f,\"files_identical\":%s,"
      "\"create_transient_bytes\":%ld,\"whole_init_bytes\":%ld,\"load_avg_1m\":%.2f}\n",
      static_cast<long>(params), static_cast<long>(16 * params),
      static_cast<long>(streamed_peak), static_cast<long>(whole_peak),
      static_cast<double>(streamed_peak) / params, static_cast<double>(whole_peak) / params,
      streamed_s, whole_s, identical ? "true" : "false", static_cast<long>(create_transient),
      static_cast<long>(whole_init), load1);
  std::filesystem::remove_all(dir);
  return identical ? 0 : 1;
}
