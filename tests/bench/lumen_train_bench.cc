// One side of //tests/bench:train_bench: times Lumen's Trainer::Step on a token file and prints
// one JSON object. Before stepping it exports the initial weights (config.json +
// model.safetensors) so the PyTorch side trains the very same model on the same batches.
// Usage: lumen_train_bench --data=FILE --export_dir=DIR [--vocab=256] [--layers=4]
//          [--hidden=256] [--heads=4] [--intermediate=688] [--seq=256] [--batch=8]
//          [--threads=2] [--warmup=1] [--steps=5]
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "worker/engine/trainer.h"

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {
      {"data", ""},    {"export_dir", ""}, {"vocab", "256"},  {"layers", "4"},
      {"hidden", "256"}, {"heads", "4"},   {"intermediate", "688"}, {"seq", "256"},
      {"batch", "8"},  {"threads", "2"},   {"warmup", "1"},   {"steps", "5"}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos || flags.count(a.substr(2, eq - 2)) == 0) {
      std::fprintf(stderr, "unknown or malformed flag %s\n", a.c_str());
      return 2;
    }
    flags[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  auto num = [&](const char* k) { return std::atol(flags[k].c_str()); };
  if (flags["data"].empty() || flags["export_dir"].empty()) {
    std::fprintf(stderr, "--data and --export_dir are required\n");
    return 2;
  }
  lumen::engine::TrainerOptions o;
  o.model.num_hidden_layers = num("layers");
  o.model.hidden_size = num("hidden");
  o.model.num_attention_heads = num("heads");
  o.model.num_key_value_heads = o.model.num_attention_heads;
  o.model.intermediate_size = num("intermediate");
  o.model.vocab_size = num("vocab");
  o.model.max_position_embeddings = num("seq");
  o.train.seq_len = num("seq");
  o.train.micro_batch_size = num("batch");
  o.train.grad_accum_steps = 1;
  const long warmup = num("warmup"), steps = num("steps");
  o.train.steps = warmup + steps;
  o.optimizer.schedule = lumen::engine::ScheduleKind::kConstant;
  o.num_threads = static_cast<int>(num("threads"));
  o.data.path = flags["data"];
  auto t = lumen::engine::Trainer::Create(o);
  if (!t.ok()) {
    std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
    return 1;
  }
  if (auto s = (*t)->Export(flags["export_dir"]); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  double first_loss = 0, secs = 0, tokens = 0, last_loss = 0;
  for (long s = 0; s < warmup + steps; ++s) {
    auto r = (*t)->Step();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    if (s == 0) first_loss = r->loss;
    last_loss = r->loss;
    if (s >= warmup) {
      secs += r->step_time_s;
      tokens += static_cast<double>(r->tokens);
    }
  }
  std::printf(
      "{\"tokens_per_s\": %.1f, \"step_time_s\": %.4f, \"timed_steps\": %ld, "
      "\"first_loss\": %.6f, \"last_loss\": %.6f}\n",
      tokens / secs, secs / static_cast<double>(steps), steps, first_loss, last_loss);
  return 0;
}
