// Training throughput and MFU of the CUDA device on one model shape, one mode per run, as one
// JSON line (tests/gpu/check.sh runs it per shape and mode next to gpu_bench_torch.py):
//   memory            everything resident, activations kept (no recompute)
//   memory_recompute  everything resident, each layer recomputed in the backward (the
//                     schedule the offloaded mode must use)
//   offload           the worker's offloaded trainer (CudaOffloadTrainer) with the device
//                     capped to --offload_fraction of the training state: decoder layers,
//                     embedding and head stream through slots from pinned host memory (next
//                     layer prefetched on the copy stream), layer-input checkpoints go to
//                     pinned host memory, AdamW runs on the host per layer while the device
//                     continues with the backward (DESIGN.md section 2). The LM head's weight
//                     gradient is made in --head_blocks blocks of vocabulary rows and the
//                     embedding's gradient is added on the host: neither fp32 gradient of a
//                     [vocab, hidden] matrix is ever on the device.
//   offload_clip      offload as a job with grad_clip 1.0 runs it under lumend
//                     --optimizer-overlap backward: AdamW during the backward beside the
//                     current state, kept or redone once the norm is known
//                     (CudaOffloadOptions::speculate); clipped_steps says how many timed steps
//                     needed the redo
//   kernels           per-kernel times (attention on both kernel sets, GEMMs, RMSNorm, SwiGLU,
//                     cross-entropy) at the shape of one micro-batch
//   sizes             no GPU needed: the training state, offload's working set and the
//                     budget and oversubscription offload would run at
// No gradient clipping in any mode but offload_clip (the PyTorch side does none either).
//   gpu_bench --name=1b --hidden=2048 --inter=8192 --layers=16 --heads=32 --kv_heads=8
//             --vocab=128256 --tied=1 --batch=1 --seq=2048 --micro_batches=16 --mode=memory
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/device.h"
#include "worker/cuda/gemm.h"
#include "worker/cuda/kernels.h"
#include "worker/cuda/model.h"
#include "worker/cuda/offload_trainer.h"
#include "worker/cuda/trainer.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"

namespace lumen::cuda {
namespace {

struct Args {
  std::string name = "custom", mode = "memory", attention = "auto";
  int64_t hidden = 2048, inter = 8192, layers = 16, heads = 32, kv_heads = 8, vocab = 128256;
  int64_t tied = 1, batch = 2, seq = 2048, micro_batches = 8, warmup = 1, steps = 3;
  int64_t head_chunk = 2048, threads = 0;
  // offload: token rows per logits chunk (its [chunk, vocab] logits are the largest scratch),
  // and vocabulary row blocks of the LM head's weight gradient (its fp32 gradient stays off the
  // device: one block at a time, double-buffered, goes home).
  int64_t offload_head_chunk = 512, head_blocks = 32;
  double offload_fraction = 0.1;
};

bool ParseArgs(int argc, char** argv, Args* a) {
  std::map<std::string, int64_t*> ints = {
      {"hidden", &a->hidden}, {"inter", &a->inter},       {"layers", &a->layers},
      {"heads", &a->heads},   {"kv_heads", &a->kv_heads}, {"vocab", &a->vocab},
      {"tied", &a->tied},     {"batch", &a->batch},       {"seq", &a->seq},
      {"micro_batches", &a->micro_batches},               {"warmup", &a->warmup},
      {"steps", &a->steps},   {"head_chunk", &a->head_chunk}, {"threads", &a->threads},
      {"offload_head_chunk", &a->offload_head_chunk},     {"head_blocks", &a->head_blocks}};
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) != 0 || s.find('=') == std::string::npos) return false;
    const std::string key = s.substr(2, s.find('=') - 2), val = s.substr(s.find('=') + 1);
    if (key == "name") {
      a->name = val;
    } else if (key == "mode") {
      a->mode = val;
    } else if (key == "attention") {
      a->attention = val;
    } else if (key == "offload_fraction") {
      a->offload_fraction = std::atof(val.c_str());
    } else if (ints.count(key)) {
      *ints[key] = std::atoll(val.c_str());
    } else {
      return false;
    }
  }
  return (a->mode == "memory" || a->mode == "memory_recompute" || a->mode == "offload" ||
          a->mode == "offload_clip" ||
          a->mode == "kernels" || a->mode == "sizes") &&
         (a->attention == "auto" || a->attention == "cuda_cores" ||
          a->attention == "tensor_cores");
}

kernels::AttentionKernel AttentionOf(const Args& a) {
  if (a.attention == "cuda_cores") return kernels::AttentionKernel::kCudaCores;
  if (a.attention == "tensor_cores") return kernels::AttentionKernel::kTensorCores;
  return kernels::AttentionKernel::kAuto;
}

engine::ModelConfig ConfigOf(const Args& a) {
  engine::ModelConfig c;
  c.hidden_size = a.hidden;
  c.intermediate_size = a.inter;
  c.num_hidden_layers = a.layers;
  c.num_attention_heads = a.heads;
  c.num_key_value_heads = a.kv_heads;
  c.vocab_size = a.vocab;
  c.max_position_embeddings = a.seq;
  c.rope_theta = 500000.0;
  c.tie_word_embeddings = a.tied != 0;
  return c;
}

// Model FLOPs per token, the formula gpu_bench_torch.py uses (recompute not counted).
double FlopsPerToken(const engine::ModelConfig& c, int64_t seq) {
  const double h = c.hidden_size, qd = c.num_attention_heads * c.head_dim(),
               kd = c.num_key_value_heads * c.head_dim();
  const double mats =
      c.num_hidden_layers * (h * (qd + 2 * kd) + qd * h + 3 * h * c.intermediate_size);
  return 6 * (mats + static_cast<double>(c.vocab_size) * h) +
         6.0 * c.num_hidden_layers * seq * qd;
}

// Dense bf16 peak of the card (0 when unknown); LUMEN_PEAK_TFLOPS overrides.
double PeakFlops(const std::string& name) {
  if (const char* env = std::getenv("LUMEN_PEAK_TFLOPS")) return std::atof(env) * 1e12;
  std::string n = name;
  for (char& ch : n) ch = static_cast<char>(std::toupper(ch));
  if (n.find("H100") != std::string::npos && n.find("PCIE") != std::string::npos) return 756e12;
  if (n.find("H100") != std::string::npos || n.find("H200") != std::string::npos ||
      n.find("H800") != std::string::npos) {
    return 989e12;
  }
  if (n.find("A100") != std::string::npos) return 312e12;
  if (n.find("4090") != std::string::npos) return 165e12;
  if (n.find("L4") != std::string::npos) return 121e12;
  return 0;
}

struct Result {
  // loss_first: the first step's (before any update); loss: the last timed step's.
  double step_s = 0, loss = 0, loss_first = 0;
  int64_t budget = 0, peak = 0, state_bytes = 0, min_working_set = 0;
  int64_t h2d_bytes = 0, d2h_bytes = 0;  // per step
  // offload, per step: seconds the host waited for the host AdamW of a decoder layer, and of
  // the embedding, norm or head, before it could issue more device work.
  double wait_layers_s = 0, wait_big_s = 0;
  int64_t clipped_steps = -1;  // offload_clip: timed steps whose norm exceeded the clip
  double busy = -1;            // offload: the device's computing share of the timed steps
};

// Random inputs, each target a fixed function of its input: something every mode learns within
// a step or two, so their losses can be compared (check.sh) and say more than ln(vocab).
void RandomIds(int64_t n, int64_t vocab, std::vector<int32_t>* in, std::vector<int32_t>* tg) {
  std::mt19937_64 rng(42);
  in->resize(n);
  tg->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    (*in)[i] = static_cast<int32_t>(rng() % vocab);
    (*tg)[i] = static_cast<int32_t>((int64_t{(*in)[i]} * 7 + 3) % vocab);
  }
}

engine::AdamWHyper Hyper() {
  engine::AdamWHyper h;
  h.lr = 1e-4;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  return h;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- In memory ----
absl::StatusOr<Result> RunMemory(const Args& a, const engine::ModelConfig& c) {
  ASSIGN_OR_RETURN(auto dev, CudaDevice::Create(CudaDeviceOptions{}));
  CudaLlamaOptions o;
  o.keep_activations = a.mode == "memory";
  o.head_chunk_tokens = a.head_chunk;
  o.attention = AttentionOf(a);
  ASSIGN_OR_RETURN(auto trainer, CudaTrainer::Create(dev.get(), c, a.batch, a.seq, o));
  RETURN_IF_ERROR(trainer->state().InitRandom(1));
  std::vector<int32_t> in, tg;
  RandomIds(a.micro_batches * a.batch * a.seq, c.vocab_size, &in, &tg);
  Result r;
  for (int64_t s = 0; s < a.warmup; ++s) {
    ASSIGN_OR_RETURN(auto sr, trainer->Step(in, tg, a.micro_batches, Hyper(), 0.0, s + 1));
    if (s == 0) r.loss_first = sr.loss;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < a.steps; ++s) {
    ASSIGN_OR_RETURN(auto sr, trainer->Step(in, tg, a.micro_batches, Hyper(), 0.0,
                                            a.warmup + s + 1));
    r.loss = sr.loss;
  }
  r.step_s = Seconds(t0) / a.steps;
  r.budget = dev->budget();
  r.peak = dev->peak();
  r.state_bytes = ResidentState::Bytes(c);
  return r;
}

// ---- Per-kernel timings at the shape of one micro-batch (mode "kernels") ----
absl::StatusOr<std::string> RunKernels(const Args& a, const engine::ModelConfig& c) {
  ASSIGN_OR_RETURN(auto dev, CudaDevice::Create(CudaDeviceOptions{}));
  cudaStream_t st = dev->compute_stream();
  const int64_t n = a.batch * a.seq, h = c.hidden_size, I = c.intermediate_size;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, D = c.head_dim();
  const int64_t qd = H * D, kd = KV * D, qkvd = qd + 2 * kd;
  const int64_t chunk = std::min(n, a.head_chunk);
  ASSIGN_OR_RETURN(DeviceBuffer qkv, dev->Allocate(2 * n * qkvd, "qkv"));
  ASSIGN_OR_RETURN(DeviceBuffer dqkv, dev->Allocate(2 * n * qkvd, "dqkv"));
  ASSIGN_OR_RETURN(DeviceBuffer att, dev->Allocate(2 * n * qd, "att"));
  ASSIGN_OR_RETURN(DeviceBuffer datt, dev->Allocate(2 * n * qd, "datt"));
  ASSIGN_OR_RETURN(DeviceBuffer lse, dev->Allocate(4 * n * H, "lse"));
  ASSIGN_OR_RETURN(DeviceBuffer delta, dev->Allocate(4 * n * H, "delta"));
  ASSIGN_OR_RETURN(DeviceBuffer x, dev->Allocate(2 * n * 2 * I, "x"));
  // fp32-sized: the weight-gradient product writes [2I, h] in fp32 into it.
  ASSIGN_OR_RETURN(DeviceBuffer w, dev->Allocate(4 * 2 * I * h, "w"));
  ASSIGN_OR_RETURN(DeviceBuffer y, dev->Allocate(2 * n * 2 * I, "y"));
  ASSIGN_OR_RETURN(DeviceBuffer logits, dev->Allocate(2 * chunk * c.vocab_size, "logits"));
  ASSIGN_OR_RETURN(DeviceBuffer losses, dev->Allocate(4 * chunk, "losses"));
  ASSIGN_OR_RETURN(DeviceBuffer rstd, dev->Allocate(4 * n, "rstd"));
  ASSIGN_OR_RETURN(DeviceBuffer ids, dev->Allocate(4 * n, "ids"));
  for (DeviceBuffer* b : {&qkv, &dqkv, &att, &datt, &x, &w, &y, &logits, &ids}) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b->get(), 0, b->bytes(), st), "kernels: init");
  }
  {
    ASSIGN_OR_RETURN(DeviceBuffer tmp, dev->Allocate(4 * n * qkvd, "kernels: random qkv"));
    RETURN_IF_ERROR(kernels::FillNormal(tmp.as<float>(), n * qkvd, 1, 1.0f, st));
    RETURN_IF_ERROR(kernels::F32ToBf16(tmp.as<float>(), n * qkvd, qkv.as<bf16>(), st));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "kernels: init");
  }
  cudaEvent_t t0, t1;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&t0), "kernels");
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&t1), "kernels");
  std::string out;
  auto time = [&](const std::string& what, double flops,
                  const std::function<absl::Status()>& fn) -> absl::Status {
    RETURN_IF_ERROR(fn());  // warm-up (plans, shared-memory opt-in)
    const int reps = 5;
    CUDA_RETURN_IF_ERROR(cudaEventRecord(t0, st), what);
    for (int i = 0; i < reps; ++i) RETURN_IF_ERROR(fn());
    CUDA_RETURN_IF_ERROR(cudaEventRecord(t1, st), what);
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(t1), what);
    float ms = 0;
    CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, t0, t1), what);
    ms /= reps;
    absl::StrAppendFormat(&out, "%s\"%s\":{\"ms\":%.4f,\"tflops\":%.1f}", out.empty() ? "" : ",",
                          what, ms, flops > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0);
    return absl::OkStatus();
  };
  const bf16* q = qkv.as<bf16>();
  const kernels::QkvView view{q, q + qd, q + qd + kd, qkvd};
  const kernels::AttentionShape shape{a.batch, a.seq, H, KV, D};
  const double att_flops = 2.0 * a.batch * H * static_cast<double>(a.seq) * a.seq * D;  // causal
  bf16* dq = dqkv.as<bf16>();
  for (auto [name, k] : {std::pair<const char*, kernels::AttentionKernel>{
                             "tensor_cores", kernels::AttentionKernel::kTensorCores},
                         {"cuda_cores", kernels::AttentionKernel::kCudaCores}}) {
    if (k == kernels::AttentionKernel::kTensorCores &&
        !kernels::internal::TensorCoreAttentionFits(D)) {
      continue;
    }
    RETURN_IF_ERROR(time(absl::StrCat("attention_forward_", name), att_flops, [&] {
      return kernels::AttentionForward(view, shape, att.as<bf16>(), lse.as<float>(), st, k);
    }));
    RETURN_IF_ERROR(time(absl::StrCat("attention_backward_", name), 2.5 * att_flops, [&] {
      return kernels::AttentionBackward(view, shape, att.as<bf16>(), datt.as<bf16>(),
                                        lse.as<float>(), delta.as<float>(), dq, dq + qd,
                                        dq + qd + kd, qkvd, st, k);
    }));
  }
  Gemm& g = dev->gemm();
  RETURN_IF_ERROR(time("gemm_gate_up_forward", 2.0 * n * 2 * I * h, [&] {
    return g.Run(false, true, n, 2 * I, h, x.as<bf16>(), h, w.as<bf16>(), h, 0.0f, nullptr,
                 y.get(), 2 * I, GemmOut::kBf16, st, "gate_up");
  }));
  RETURN_IF_ERROR(time("gemm_gate_up_weight_grad_f32", 2.0 * n * 2 * I * h, [&] {
    return g.Run(true, false, 2 * I, h, n, y.as<bf16>(), 2 * I, x.as<bf16>(), h, 1.0f, w.get(),
                 w.get(), h, GemmOut::kF32, st, "d gate_up");
  }));
  RETURN_IF_ERROR(time("rmsnorm_forward", 0, [&] {
    return kernels::RmsNormForward(x.as<bf16>(), w.as<bf16>(), n, h, 1e-5f, y.as<bf16>(),
                                   rstd.as<float>(), st);
  }));
  RETURN_IF_ERROR(time("swiglu_forward", 0, [&] {
    return kernels::SwiGluForward(x.as<bf16>(), n, I, y.as<bf16>(), st);
  }));
  RETURN_IF_ERROR(time("cross_entropy_chunk", 0, [&] {
    return kernels::CrossEntropy(logits.as<bf16>(), c.vocab_size, ids.as<int32_t>(), chunk,
                                 c.vocab_size, 1.0f, losses.as<float>(), st);
  }));
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return out;
}

// ---- Offloaded ----

// CudaOffloadTrainer, the worker's offloaded trainer, at --offload_fraction of the training
// state, with the same weights and tokens as the in-memory modes; no clipping (offload), or
// clipping at 1.0 with speculative AdamW (offload_clip).
class OffloadRunner {
 public:
  OffloadRunner(const Args& a, const engine::ModelConfig& c) : a_(a), c_(c) {
    o_.batch = a.batch;
    o_.seq = a.seq;
    o_.micro_batches = a.micro_batches;
    o_.threads = static_cast<int>(a.threads);
    o_.head_chunk_tokens = a.offload_head_chunk;
    o_.head_blocks = a.head_blocks;
    o_.attention = AttentionOf(a);
    o_.speculate = a.mode == "offload_clip";
  }

  // Device bytes the schedule holds at once, cuBLASLt's workspace included.
  int64_t WorkingSet() const {
    absl::StatusOr<int64_t> w = CudaOffloadTrainer::WorkingSetBytes(c_, o_);
    return (w.ok() ? *w : 0) + CudaDeviceOptions().gemm_workspace_bytes;
  }
  int64_t StateBytes() const { return CudaOffloadTrainer::StateBytes(c_, o_); }
  // The device budget it runs at: --offload_fraction of the state, or the working set (with
  // 64 MiB for the allocator's rounding) when that is more.
  int64_t Budget() const {
    return std::max(static_cast<int64_t>(a_.offload_fraction * StateBytes()),
                    WorkingSet() + (int64_t{64} << 20));
  }

  absl::StatusOr<Result> Run() {
    Result r;
    r.state_bytes = StateBytes();
    r.min_working_set = WorkingSet();
    CudaDeviceOptions o;
    o.budget_bytes = Budget();
    ASSIGN_OR_RETURN(std::unique_ptr<CudaDevice> dev, CudaDevice::Create(o));
    ASSIGN_OR_RETURN(std::unique_ptr<CudaOffloadTrainer> t,
                     CudaOffloadTrainer::Create(dev.get(), c_, o_));
    RETURN_IF_ERROR(t->InitRandom(1));
    std::vector<int32_t> in, tg;
    RandomIds(a_.micro_batches * a_.batch * a_.seq, c_.vocab_size, &in, &tg);
    const double clip = o_.speculate ? 1.0 : 0.0;
    if (o_.speculate) r.clipped_steps = 0;
    for (int64_t s = 0; s < a_.warmup; ++s) {
      ASSIGN_OR_RETURN(CudaOffloadStepResult sr, t->Step(in, tg, in, Hyper(), clip, s + 1));
      if (s == 0) r.loss_first = sr.loss;
    }
    RETURN_IF_ERROR(t->Flush());
    double compute_s = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < a_.steps; ++s) {
      ASSIGN_OR_RETURN(CudaOffloadStepResult sr,
                       t->Step(in, tg, in, Hyper(), clip, a_.warmup + s + 1));
      r.loss = sr.loss;
      if (o_.speculate && sr.grad_norm > clip) ++r.clipped_steps;
      r.h2d_bytes += sr.bytes_home_to_device;
      r.d2h_bytes += sr.bytes_device_to_home;
      r.wait_layers_s += sr.wait_optimizer_layers_s;
      r.wait_big_s += sr.wait_optimizer_embed_head_s;
      compute_s += sr.compute_seconds;
    }
    RETURN_IF_ERROR(t->Flush());
    r.step_s = Seconds(t0) / a_.steps;
    r.busy = compute_s / (r.step_s * a_.steps);
    if (!std::isfinite(r.loss)) {
      return absl::InternalError(absl::StrCat("offload: the loss is ", r.loss));
    }
    r.budget = dev->budget();
    r.peak = dev->peak();
    r.h2d_bytes /= a_.steps;
    r.d2h_bytes /= a_.steps;
    r.wait_layers_s /= a_.steps;
    r.wait_big_s /= a_.steps;
    return r;
  }

 private:
  const Args a_;
  const engine::ModelConfig c_;
  CudaOffloadOptions o_;
};

int Main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, &a)) {
    std::fprintf(stderr, "usage: gpu_bench --name=N "
                         "--mode=memory|memory_recompute|offload|offload_clip|kernels|sizes "
                         "--hidden= --inter= --layers= --heads= --kv_heads= --vocab= --tied= "
                         "--batch= --seq= --micro_batches= [--warmup= --steps= "
                         "--offload_fraction= --head_chunk= --offload_head_chunk= "
                         "--head_blocks= --threads= "
                         "--attention=auto|cuda_cores|tensor_cores]\n");
    return 2;
  }
  const engine::ModelConfig c = ConfigOf(a);
  std::string head = absl::StrFormat(
      "{\"name\":\"%s\",\"impl\":\"lumen\",\"mode\":\"%s\",\"attention\":\"%s\","
      "\"layers\":%d,\"hidden\":%d,\"vocab\":%d,\"tokens_per_step\":%d",
      a.name, a.mode, a.attention, a.layers, a.hidden, a.vocab,
      a.micro_batches * a.batch * a.seq);
  if (a.mode == "sizes") {  // arithmetic only: runs without a GPU
    OffloadRunner runner(a, c);
    const int64_t state = runner.StateBytes(), working = runner.WorkingSet();
    const int64_t budget = runner.Budget();
    std::printf("%s,\"training_state_bytes\":%lld,\"min_working_set_bytes\":%lld,"
                "\"offload_budget_bytes\":%lld,\"oversubscription\":%.2f,"
                "\"oversubscription_params_optimizer\":%.2f}\n",
                head.c_str(), static_cast<long long>(state), static_cast<long long>(working),
                static_cast<long long>(budget),
                static_cast<double>(state) / static_cast<double>(budget),
                static_cast<double>(ResidentState::Bytes(c)) / static_cast<double>(budget));
    return 0;
  }
  std::string why;
  if (DeviceCount(&why) == 0) {
    std::printf("%s,\"skipped\":\"no GPU: %s\"}\n", head.c_str(), why.c_str());
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  if (a.mode == "kernels") {
    absl::StatusOr<std::string> k = RunKernels(a, c);
    if (!k.ok()) {
      std::printf("%s,\"error\":\"%s\"}\n", head.c_str(), std::string(k.status().message()).c_str());
      return 1;
    }
    std::printf("%s,\"device\":\"%s\",\"kernels\":{%s}}\n", head.c_str(), prop.name, k->c_str());
    return 0;
  }
  absl::StatusOr<Result> r;
  if (a.mode == "offload" || a.mode == "offload_clip") {
    OffloadRunner runner(a, c);
    r = runner.Run();
  } else {
    r = RunMemory(a, c);
  }
  if (!r.ok()) {
    std::string msg(r.status().ToString());
    for (char& ch : msg) {
      if (ch == '"' || ch == '\\' || ch == '\n') ch = ' ';
    }
    std::printf("%s,\"device\":\"%s\",\"error\":\"%s\"}\n", head.c_str(), prop.name, msg.c_str());
    return 1;
  }
  const double tokens = static_cast<double>(a.micro_batches * a.batch * a.seq);
  const double fpt = FlopsPerToken(c, a.seq), peak = PeakFlops(prop.name);
  const double tps = tokens / r->step_s;
  std::printf(
      "%s,\"device\":\"%s\",\"step_s\":%.4f,\"tokens_per_s\":%.1f,\"model_flops_per_token\":%.6g,"
      "\"peak_flops\":%.6g,\"mfu\":%s,\"loss_first\":%.6f,\"loss\":%.6f,"
      "\"device_budget_bytes\":%lld,"
      "\"device_peak_bytes\":%lld,\"training_state_bytes\":%lld,\"oversubscription\":%.2f,"
      "\"min_working_set_bytes\":%lld,\"h2d_bytes_per_step\":%lld,\"d2h_bytes_per_step\":%lld,"
      "\"host_wait_optimizer_layers_s\":%.4f,\"host_wait_optimizer_embed_head_s\":%.4f,"
      "\"oversubscription_params_optimizer\":%.2f%s%s}\n",
      head.c_str(), prop.name, r->step_s, tps, fpt, peak,
      peak > 0 ? absl::StrFormat("%.4f", fpt * tps / peak).c_str() : "null", r->loss_first,
      r->loss,
      static_cast<long long>(r->budget), static_cast<long long>(r->peak),
      static_cast<long long>(r->state_bytes),
      static_cast<double>(r->state_bytes) / static_cast<double>(r->budget),
      static_cast<long long>(r->min_working_set), static_cast<long long>(r->h2d_bytes),
      static_cast<long long>(r->d2h_bytes), r->wait_layers_s, r->wait_big_s,
      static_cast<double>(ResidentState::Bytes(c)) / static_cast<double>(r->budget),
      r->clipped_steps >= 0
          ? absl::StrFormat(",\"clipped_steps\":%d", r->clipped_steps).c_str()
          : "",
      r->busy >= 0 ? absl::StrFormat(",\"device_busy_fraction\":%.3f", r->busy).c_str() : "");
  return 0;
}

}  // namespace
}  // namespace lumen::cuda

int main(int argc, char** argv) { return lumen::cuda::Main(argc, argv); }
