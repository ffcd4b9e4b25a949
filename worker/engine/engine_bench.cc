// Measures Trainer::Step tokens/s on synthetic data.
// Usage: engine_bench [layers=4] [hidden=256] [heads=4] [seq=256] [batch=8] [vocab=8000]
//                     [threads=2] [steps=3] [checkpointing=0]
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "worker/engine/trainer.h"

int main(int argc, char** argv) {
  auto arg = [&](int i, long def) { return argc > i ? std::atol(argv[i]) : def; };
  lumen::engine::TrainerOptions o;
  o.model.num_hidden_layers = arg(1, 4);
  o.model.hidden_size = arg(2, 256);
  o.model.num_attention_heads = arg(3, 4);
  o.model.num_key_value_heads = o.model.num_attention_heads;
  o.model.intermediate_size = o.model.hidden_size * 8 / 3 / 16 * 16 + 16;  // 688 for 256
  o.train.seq_len = arg(4, 256);
  o.model.max_position_embeddings = o.train.seq_len;
  o.train.micro_batch_size = arg(5, 8);
  o.model.vocab_size = arg(6, 8000);
  o.num_threads = static_cast<int>(arg(7, 2));
  const long steps = arg(8, 3);
  o.activation_checkpointing = arg(9, 0) != 0;
  o.train.steps = steps + 1;
  o.train.grad_accum_steps = 1;
  const std::string path = "/tmp/lumen_engine_bench_tokens.bin";
  {
    std::mt19937_64 rng(1);
    std::vector<uint16_t> toks(1 << 20);
    for (auto& t : toks) t = static_cast<uint16_t>(rng() % o.model.vocab_size);
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(toks.data(), 2, toks.size(), f);
    std::fclose(f);
  }
  o.data.path = path;
  auto t = lumen::engine::Trainer::Create(o);
  if (!t.ok()) {
    std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
    return 1;
  }
  if (const char* dir = std::getenv("LUMEN_BENCH_EXPORT"); dir != nullptr) {
    // For comparing with torch_reference.py bench on the same model.
    if (auto s = (*t)->Export(dir); !s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
  }
  (void)(*t)->Step();  // warm-up (allocations)
  double secs = 0, tokens = 0;
  for (long s = 0; s < steps; ++s) {
    auto r = (*t)->Step();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    secs += r->step_time_s;
    tokens += static_cast<double>(r->tokens);
    std::printf("step %lld loss %.4f time %.3fs\n", static_cast<long long>(r->step), r->loss,
                r->step_time_s);
  }
  std::printf("tokens_per_s %.1f\n", tokens / secs);
  return 0;
}
