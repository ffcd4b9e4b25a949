// The streamed CUDA trainer's host AdamW (worker/cuda/host_state.h) on this machine's CPUs, no
// GPU needed: parameters updated per second, for 1..--threads threads, with the master weights
// and moments in memory and in an in-memory TensorHome (the chunked read-update-write pipeline
// the memstore's NVMe tier uses, without the drive). One JSON line per configuration. A
// streamed GPU step keeps up with the device when its parameters / this rate is under the
// device's step time.
//   bazel run -c opt //tests/bench:host_adamw_bench -- --layers=4 --threads=2
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "worker/cuda/host_state.h"
#include "worker/engine/tensor_home.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {
namespace {

int Main(int argc, char** argv) {
  int64_t layers = 4, threads = 2, steps = 3;
  for (int i = 1; i < argc; ++i) {
    long v = 0;
    if (std::sscanf(argv[i], "--layers=%ld", &v) == 1) {
      layers = v;
    } else if (std::sscanf(argv[i], "--threads=%ld", &v) == 1) {
      threads = v;
    } else if (std::sscanf(argv[i], "--steps=%ld", &v) == 1) {
      steps = v;
    } else {
      std::fprintf(stderr, "usage: host_adamw_bench [--layers=4] [--threads=2] [--steps=3]\n");
      return 2;
    }
  }
  // Llama-3.2-1B's layer shape and a 32K vocabulary, untied.
  engine::ModelConfig c;
  c.hidden_size = 2048;
  c.intermediate_size = 8192;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.vocab_size = 32000;
  c.max_position_embeddings = 2048;
  const std::vector<TensorGroupShape> shapes = TensorGroupShapes(c);
  int64_t elems = 0;
  std::vector<std::vector<uint16_t>> params;
  std::vector<std::vector<float>> grads;
  std::vector<HostGroupBuffers> buffers;
  for (const TensorGroupShape& s : shapes) {
    params.emplace_back(s.elems);
    grads.emplace_back(s.elems, 1e-3f);
    elems += s.elems;
  }
  for (size_t g = 0; g < shapes.size(); ++g) buffers.push_back({params[g].data(), grads[g].data()});
  engine::AdamWHyper h;
  h.lr = 1e-4;
  h.beta2 = 0.95;
  h.weight_decay = 0.1;
  for (bool at_home : {false, true}) {
    for (int64_t t = 1; t <= threads; ++t) {
      engine::ThreadPool pool(static_cast<int>(t));
      engine::MemoryTensorHome home;
      StateHome state_home;
      if (at_home) state_home.home = &home;
      auto state = HostTrainingState::Create(c, buffers, state_home, pool);
      if (state.ok()) {
        if (absl::Status s = (*state)->InitRandom(1, pool); !s.ok()) state = s;
      }
      if (!state.ok()) {
        std::fprintf(stderr, "%s\n", std::string(state.status().message()).c_str());
        return 1;
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t step = 1; step <= steps; ++step) {
        for (size_t g = 0; g < shapes.size(); ++g) {
          if (absl::Status s = (*state)->AdamW(g, nullptr, h, step, 1.0f, pool); !s.ok()) {
            std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
            return 1;
          }
        }
      }
      const double step_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
      std::printf("%s\n", absl::StrFormat(
                              "{\"bench\":\"host_adamw\",\"state\":\"%s\",\"threads\":%d,"
                              "\"params\":%d,\"step_s\":%.4f,\"params_per_s\":%.4g}",
                              at_home ? "home_chunks" : "memory", t, elems, step_s,
                              static_cast<double>(elems) / step_s)
                              .c_str());
    }
  }
  return 0;
}

}  // namespace
}  // namespace lumen::cuda

int main(int argc, char** argv) { return lumen::cuda::Main(argc, argv); }
