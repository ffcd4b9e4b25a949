// Training throughput and MFU of the CUDA device on one model shape, one mode per run, as one
// JSON line (tests/gpu/check.sh runs it per shape and mode next to gpu_bench_torch.py):
//   memory            everything resident, activations kept (no recompute)
//   memory_recompute  everything resident, each layer recomputed in the backward (the
//                     schedule the offloaded mode must use)
//   offload           the device capped to --offload_fraction of the training state:
//                     decoder layers, embedding and head stream through slots from pinned host
//                     memory (next layer prefetched on the copy stream), layer-input checkpoints
//                     go to pinned host memory, AdamW runs on the host per layer while the
//                     device continues with the backward (DESIGN.md section 2). The LM head's
//                     weight gradient is made in --head_blocks blocks of vocabulary rows, each
//                     sent home as it is done, and the embedding's gradient is added on the
//                     host from the tokens' input gradients: neither fp32 gradient of a
//                     [vocab, hidden] matrix is ever on the device.
//   kernels           per-kernel times (attention on both kernel sets, GEMMs, RMSNorm, SwiGLU,
//                     cross-entropy) at the shape of one micro-batch
//   sizes             no GPU needed: the training state, offload's working set and the
//                     budget and oversubscription offload would run at
// No gradient clipping in any mode (the PyTorch side does none either).
//   gpu_bench --name=1b --hidden=2048 --inter=8192 --layers=16 --heads=32 --kv_heads=8
//             --vocab=128256 --tied=1 --batch=1 --seq=2048 --micro_batches=16 --mode=memory
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
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
#include "worker/cuda/trainer.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/thread_pool.h"

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

uint16_t ToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float FromBf16Bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Result {
  // loss_first: the first step's (before any update); loss: the last timed step's.
  double step_s = 0, loss = 0, loss_first = 0;
  int64_t budget = 0, peak = 0, state_bytes = 0, min_working_set = 0;
  int64_t h2d_bytes = 0, d2h_bytes = 0;  // per step
  // offload, per step: seconds the host waited for the host AdamW of a decoder layer, and of
  // the embedding, norm or head, before it could issue more device work.
  double wait_layers_s = 0, wait_big_s = 0;
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

// kernels::FillNormal's values on the host (the same hash; float math within an ulp or two),
// so the offloaded mode starts from the weights ResidentState::InitRandom gives the others.
void HostFillNormal(float* x, int64_t begin, int64_t end, uint64_t seed, float stddev) {
  for (int64_t i = begin; i < end; ++i) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u1 = (static_cast<float>(z >> 40) + 1.0f) * (1.0f / 16777217.0f);
    const float u2 = static_cast<float>((z >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    x[i] = stddev * std::sqrt(-2.0f * std::log(u1)) *
           static_cast<float>(std::cos(M_PI * static_cast<double>(2.0f * u2)));
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

// CPUs this process may run on (a container's share, not the host's count).
int UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
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
  ASSIGN_OR_RETURN(DeviceBuffer w, dev->Allocate(2 * 2 * I * h, "w"));
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

// Runs AdamW for one tensor group on the host once its gradients have reached host memory,
// then writes the bf16 copy for the next step. Jobs run in submission order on one thread
// that splits each over a ThreadPool.
class HostOptimizer {
 public:
  struct Job {
    cudaEvent_t grads_ready;
    float *master, *grad, *m, *v;
    uint16_t* param_bf16;
    const TensorGroupShape* shape;
    engine::AdamWHyper hyper;
    int64_t step;
    std::promise<void> done;
    // Optional: run with the optimizer's threads once the gradients are home, before AdamW
    // (the embedding's gradient is completed there), and after it (the embedding rows of the
    // next step are gathered there).
    std::function<void(engine::ThreadPool&)> before, after;
  };
  HostOptimizer(int device, int threads)
      : device_(device), pool_(threads), thread_([this] { Loop(); }) {}
  ~HostOptimizer() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::shared_future<void> Submit(Job job) {
    std::shared_future<void> f = job.done.get_future().share();
    {
      std::lock_guard<std::mutex> l(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_all();
    return f;
  }

 private:
  void Loop() {
    cudaSetDevice(device_);
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      cudaEventSynchronize(job.grads_ready);
      if (job.before) job.before(pool_);
      auto update = [&job](const DeviceTensorGroup::Segment& seg, int64_t b, int64_t e) {
        engine::AdamWHyper h = job.hyper;
        if (!seg.matrix) h.weight_decay = 0;
        const int64_t o = seg.offset;
        engine::AdamWUpdate(job.master + o + b, job.grad + o + b, job.m + o + b, job.v + o + b,
                            e - b, h, job.step);
        for (int64_t i = o + b; i < o + e; ++i) job.param_bf16[i] = ToBf16Bits(job.master[i]);
      };
      const std::vector<DeviceTensorGroup::Segment>& segs = job.shape->segments;
      if (segs.size() > 64) {
        // The embedding's runs of token rows: thousands of short segments, split by segment
        // (one ParallelFor each would run most of them on this thread alone).
        pool_.ParallelFor(static_cast<int64_t>(segs.size()), 1, [&](int64_t sb, int64_t se) {
          for (int64_t i = sb; i < se; ++i) update(segs[i], 0, segs[i].size);
        });
      } else {
        for (const DeviceTensorGroup::Segment& seg : segs) {
          pool_.ParallelFor(seg.size, 1 << 16,
                            [&](int64_t b, int64_t e) { update(seg, b, e); });
        }
      }
      if (job.after) job.after(pool_);
      job.done.set_value();
    }
  }

  const int device_;
  engine::ThreadPool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::thread thread_;
};

class OffloadRunner {
 public:
  OffloadRunner(const Args& a, const engine::ModelConfig& c)
      : a_(a), c_(c), shapes_(TensorGroupShapes(c)), L_(c.num_hidden_layers),
        n_(a.batch * a.seq), A_(a.micro_batches) {}

  // Device bytes the schedule holds at once (besides the allocator's rounding).
  int64_t WorkingSet() const {
    const int64_t h = c_.hidden_size, layer = shapes_[0].elems, big = c_.vocab_size * h;
    auto model = CudaLlama::Create(nullptr, c_, Options());
    const int64_t scratch =
        (*model)->LayerScratchBytes(a_.batch, a_.seq) + (*model)->HeadScratchBytes(a_.batch, a_.seq);
    // Parameter and gradient slots of two layers, the embedding or head in bf16, two blocks of
    // the head's gradient, norms, two activation sets of every micro-batch, two checkpoint
    // slots, token ids and log-sum-exps, the loss, the scratch and cuBLASLt's workspace.
    return 2 * 2 * layer + 2 * 4 * layer + 2 * big + 2 * 4 * BlockRows() * h + 6 * h +
           2 * (2 * A_ * n_ * h) + 2 * (2 * n_ * h) + 8 * A_ * n_ + 4 * A_ * n_ + 8 + scratch +
           (int64_t{32} << 20) + 64 * 256;
  }
  // The training state as the engine counts it (OffloadRequirements::training_state_bytes):
  // parameters (bf16 and fp32 master), gradients and AdamW moments, and the step's activation
  // checkpoints (every layer's input and the last layer's output, every micro-batch).
  int64_t StateBytes() const {
    return ResidentState::Bytes(c_) + 2 * (L_ + 1) * A_ * n_ * c_.hidden_size;
  }
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
    ASSIGN_OR_RETURN(dev_, CudaDevice::Create(o));
    RETURN_IF_ERROR(Setup());
    for (int64_t s = 0; s < a_.warmup; ++s) {
      RETURN_IF_ERROR(Step(s + 1));
      if (s == 0) {
        RETURN_IF_ERROR(Finish());
        ASSIGN_OR_RETURN(r.loss_first, ReadLoss());
      }
    }
    RETURN_IF_ERROR(Finish());
    h2d_ = d2h_ = 0;
    wait_layers_s_ = wait_big_s_ = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < a_.steps; ++s) RETURN_IF_ERROR(Step(a_.warmup + s + 1));
    RETURN_IF_ERROR(Finish());
    r.step_s = Seconds(t0) / a_.steps;
    ASSIGN_OR_RETURN(r.loss, ReadLoss());
    if (!std::isfinite(r.loss)) {
      return absl::InternalError(absl::StrCat("offload: the loss is ", r.loss));
    }
    r.budget = dev_->budget();
    r.peak = dev_->peak();
    r.h2d_bytes = h2d_ / a_.steps;
    r.d2h_bytes = d2h_ / a_.steps;
    r.wait_layers_s = wait_layers_s_ / a_.steps;
    r.wait_big_s = wait_big_s_ / a_.steps;
    return r;
  }

 private:
  CudaLlamaOptions Options() const {
    CudaLlamaOptions o;
    o.keep_activations = false;
    o.head_chunk_tokens = a_.offload_head_chunk;
    o.attention = AttentionOf(a_);
    return o;
  }
  // Vocabulary rows per block of the head's weight gradient.
  int64_t BlockRows() const {
    const int64_t blocks = std::max<int64_t>(1, a_.head_blocks);
    return (c_.vocab_size + blocks - 1) / blocks;
  }
  size_t EmbedGroup() const { return L_; }
  size_t NormGroup() const { return L_ + 1; }
  size_t HeadGroup() const { return c_.tie_word_embeddings ? L_ : L_ + 2; }

  absl::Status Setup() {
    const int64_t h = c_.hidden_size, layer = shapes_[0].elems, big = c_.vocab_size * h;
    ASSIGN_OR_RETURN(model_, CudaLlama::Create(dev_.get(), c_, Options()));
    for (int i = 0; i < 2; ++i) {
      ASSIGN_OR_RETURN(param_slot_[i], dev_->Allocate(2 * layer, "offload: layer parameter slot"));
      ASSIGN_OR_RETURN(grad_slot_[i], dev_->Allocate(4 * layer, "offload: layer gradient slot"));
      ASSIGN_OR_RETURN(act_[i], dev_->Allocate(2 * A_ * n_ * h, "offload: activations"));
      ASSIGN_OR_RETURN(xslot_[i], dev_->Allocate(2 * n_ * h, "offload: checkpoint slot"));
    }
    ASSIGN_OR_RETURN(big_param_, dev_->Allocate(2 * big, "offload: embedding/head parameters"));
    for (int i = 0; i < 2; ++i) {
      ASSIGN_OR_RETURN(block_grad_[i], dev_->Allocate(4 * BlockRows() * h,
                                                      "offload: head gradient block"));
    }
    ASSIGN_OR_RETURN(lse_, dev_->Allocate(4 * A_ * n_, "offload: log-sum-exps"));
    ASSIGN_OR_RETURN(norm_param_, dev_->Allocate(2 * h, "offload: norm"));
    ASSIGN_OR_RETURN(norm_grad_, dev_->Allocate(4 * h, "offload: norm gradient"));
    ASSIGN_OR_RETURN(ids_, dev_->Allocate(8 * A_ * n_, "offload: token ids"));
    ASSIGN_OR_RETURN(loss_sum_, dev_->Allocate(8, "offload: loss"));
    RETURN_IF_ERROR(model_->EnsureScratch(a_.batch, a_.seq));
    // Host side.
    const int threads = a_.threads > 0 ? static_cast<int>(a_.threads) : UsableCpus();
    engine::ThreadPool init_pool(threads);
    host_.resize(shapes_.size());
    for (size_t g = 0; g < shapes_.size(); ++g) {
      HostGroup& hg = host_[g];
      const int64_t e = shapes_[g].elems;
      ASSIGN_OR_RETURN(hg.param, dev_->AllocatePinned(2 * e, "offload: host parameters"));
      ASSIGN_OR_RETURN(hg.grad, dev_->AllocatePinned(4 * e, "offload: host gradients"));
      // Uninitialised, then filled by the pool (a single-threaded fill of 8b's 33 GB of fp32
      // state takes tens of seconds).
      hg.master.reset(new float[e]);
      hg.m.reset(new float[e]);
      hg.v.reset(new float[e]);
      init_pool.ParallelFor(e, 1 << 20, [&](int64_t b, int64_t en) {
        std::fill(hg.master.get() + b, hg.master.get() + en, 0.0f);
        std::fill(hg.m.get() + b, hg.m.get() + en, 0.0f);
        std::fill(hg.v.get() + b, hg.v.get() + en, 0.0f);
      });
      // ResidentState::InitRandom(1)'s weights (seed per group and segment).
      for (const auto& seg : shapes_[g].segments) {
        const uint64_t seed = (uint64_t{1} * 1000003 + g) * 1000003 + seg.offset;
        float* p = hg.master.get() + seg.offset;
        init_pool.ParallelFor(seg.size, 1 << 16, [&](int64_t b, int64_t en) {
          if (seg.matrix) {
            HostFillNormal(p, b, en, seed, static_cast<float>(c_.init_std));
          } else {
            std::fill(p + b, p + en, 1.0f);
          }
        });
      }
      uint16_t* pb = hg.param.as<uint16_t>();
      init_pool.ParallelFor(e, 1 << 16, [&](int64_t b, int64_t en) {
        for (int64_t i = b; i < en; ++i) pb[i] = ToBf16Bits(hg.master[i]);
      });
      ASSIGN_OR_RETURN(hg.ready, Event::Create("offload: group event"));
    }
    ASSIGN_OR_RETURN(ckpt_, dev_->AllocatePinned(2 * L_ * A_ * n_ * h, "offload: checkpoints"));
    ASSIGN_OR_RETURN(embed_dx_, dev_->AllocatePinned(2 * A_ * n_ * h, "offload: embedding dx"));
    ASSIGN_OR_RETURN(embed_in_, dev_->AllocatePinned(2 * A_ * n_ * h, "offload: embedding rows"));
    for (Event* e : {&ev_slot_ready_[0], &ev_slot_ready_[1], &ev_slot_free_[0], &ev_slot_free_[1],
                     &ev_act_saved_[0], &ev_act_saved_[1], &ev_grad_saved_[0], &ev_grad_saved_[1],
                     &ev_x_ready_[0], &ev_x_ready_[1], &ev_x_free_[0], &ev_x_free_[1],
                     &ev_big_param_ready_, &ev_big_param_free_, &ev_block_saved_[0],
                     &ev_block_saved_[1], &ev_norm_ready_, &ev_mark_}) {
      ASSIGN_OR_RETURN(*e, Event::Create("offload: events"));
    }
    optimizer_ = std::make_unique<HostOptimizer>(dev_->device_index(), threads);
    done_.resize(shapes_.size());
    std::vector<int32_t>& in = host_ids_;
    std::vector<int32_t> tg;
    RandomIds(A_ * n_, c_.vocab_size, &in, &tg);
    embed_rows_.assign(in.begin(), in.end());
    std::sort(embed_rows_.begin(), embed_rows_.end());
    embed_rows_.erase(std::unique(embed_rows_.begin(), embed_rows_.end()), embed_rows_.end());
    if (!c_.tie_word_embeddings) {  // only the step's rows are written (see Step)
      float* g = host_[EmbedGroup()].grad.as<float>();
      init_pool.ParallelFor(shapes_[EmbedGroup()].elems, 1 << 20, [&](int64_t b, int64_t e) {
        std::fill(g + b, g + e, 0.0f);
      });
    }
    // The embedding's AdamW in two jobs: the rows of the step's tokens (which the next step's
    // forward needs) first, the others after layer 0's.
    embed_rows_shape_.segments.clear();
    embed_rest_shape_.segments.clear();
    int64_t next_row = 0;
    for (size_t i = 0; i < embed_rows_.size();) {
      size_t j = i + 1;
      while (j < embed_rows_.size() && embed_rows_[j] == embed_rows_[j - 1] + 1) ++j;
      const int64_t first = embed_rows_[i], count = static_cast<int64_t>(j - i);
      if (first > next_row) {
        embed_rest_shape_.segments.push_back({next_row * h, (first - next_row) * h, true});
      }
      embed_rows_shape_.segments.push_back({first * h, count * h, true});
      next_row = first + count;
      i = j;
    }
    if (next_row < c_.vocab_size) {
      embed_rest_shape_.segments.push_back({next_row * h, (c_.vocab_size - next_row) * h, true});
    }
    GatherEmbeddingRows(init_pool);
    // On the compute stream, which a plain cudaMemcpy (legacy stream) would not be ordered with.
    cudaStream_t cs = dev_->compute_stream();
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.get(), in.data(), 4 * A_ * n_,
                                         cudaMemcpyHostToDevice, cs),
                         "offload: ids");
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.as<int32_t>() + A_ * n_, tg.data(), 4 * A_ * n_,
                                         cudaMemcpyHostToDevice, cs),
                         "offload: ids");
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cs), "offload: ids");
    return absl::OkStatus();
  }

  struct HostGroup {
    PinnedBuffer param, grad;
    std::unique_ptr<float[]> master, m, v;
    Event ready;  // gradients are in `grad`
  };

  // Waits for group g's AdamW; counts the time the host (which issues the device's work)
  // was held, for decoder layers and for the embedding, norm and head.
  void WaitOptimizer(size_t g) {
    if (!done_[g].valid()) return;
    const auto t0 = std::chrono::steady_clock::now();
    done_[g].wait();
    (static_cast<int64_t>(g) < L_ ? wait_layers_s_ : wait_big_s_) += Seconds(t0);
  }

  // Issues the copy of decoder layer l's parameters into slot l % 2 (skipped when held).
  absl::Status FetchLayer(int64_t l) {
    const int s = static_cast<int>(l % 2);
    if (slot_holds_[s] == l && !params_stale_[l]) return absl::OkStatus();
    cudaStream_t h2d = dev_->h2d_stream();
    RETURN_IF_ERROR(ev_slot_free_[s].StreamWait(h2d, "offload: fetch layer"));
    WaitOptimizer(l);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(param_slot_[s].get(), host_[l].param.get(),
                                         2 * shapes_[l].elems, cudaMemcpyHostToDevice, h2d),
                         absl::StrCat("offload: fetch layer ", l));
    h2d_ += 2 * shapes_[l].elems;
    RETURN_IF_ERROR(ev_slot_ready_[s].Record(h2d, "offload: fetch layer"));
    slot_holds_[s] = l;
    params_stale_[l] = false;
    return absl::OkStatus();
  }

  absl::Status FetchBig(size_t g) {
    cudaStream_t h2d = dev_->h2d_stream();
    RETURN_IF_ERROR(ev_big_param_free_.StreamWait(h2d, "offload: fetch embedding/head"));
    WaitOptimizer(g);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(big_param_.get(), host_[g].param.get(),
                                         2 * shapes_[g].elems, cudaMemcpyHostToDevice, h2d),
                         "offload: fetch embedding/head");
    h2d_ += 2 * shapes_[g].elems;
    return ev_big_param_ready_.Record(h2d, "offload: fetch embedding/head");
  }

  bf16* Act(int set, int64_t a) const {
    return act_[set].as<bf16>() + a * n_ * c_.hidden_size;
  }
  bf16* Ckpt(int64_t l, int64_t a) const {
    return ckpt_.as<bf16>() + (l * A_ + a) * n_ * c_.hidden_size;
  }

  // Copies `bytes` of device memory home to `dst` on the copy stream once the compute stream
  // has produced them; records `saved` (optional) when the copy is done.
  absl::Status CopyHome(void* dst, const void* src, int64_t bytes, Event* saved,
                        const std::string& op) {
    cudaStream_t d2h = dev_->d2h_stream();
    RETURN_IF_ERROR(ev_mark_.Record(dev_->compute_stream(), op));
    RETURN_IF_ERROR(ev_mark_.StreamWait(d2h, op));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, d2h), op);
    d2h_ += bytes;
    if (saved != nullptr) RETURN_IF_ERROR(saved->Record(d2h, op));
    return absl::OkStatus();
  }

  // Queues AdamW on `segments` of group g (all of it when null) for when everything copied
  // home so far has arrived; `done` (default: the group's) receives its completion.
  absl::Status QueueOptimizer(size_t g, int64_t step,
                              std::function<void(engine::ThreadPool&)> before = nullptr,
                              std::function<void(engine::ThreadPool&)> after = nullptr,
                              const TensorGroupShape* segments = nullptr,
                              std::shared_future<void>* done = nullptr) {
    HostGroup& hg = host_[g];
    RETURN_IF_ERROR(hg.ready.Record(dev_->d2h_stream(), "offload: gradients"));
    HostOptimizer::Job job{hg.ready.get(), hg.master.get(), hg.grad.as<float>(), hg.m.get(),
                           hg.v.get(), hg.param.as<uint16_t>(),
                           segments != nullptr ? segments : &shapes_[g], Hyper(), step,
                           std::promise<void>(), std::move(before), std::move(after)};
    *(done != nullptr ? done : &done_[g]) = optimizer_->Submit(std::move(job));
    if (static_cast<int64_t>(g) < L_) params_stale_[g] = true;
    return absl::OkStatus();
  }

  // Copies the device gradients of group g home and, unless `queue` is false, queues its
  // optimizer.
  absl::Status SaveGrads(size_t g, const void* src, Event* saved, int64_t step,
                         bool queue = true) {
    RETURN_IF_ERROR(CopyHome(host_[g].grad.get(), src, 4 * shapes_[g].elems, saved,
                             absl::StrCat("offload: gradients of group ", g)));
    return queue ? QueueOptimizer(g, step) : absl::OkStatus();
  }

  // The step's embedding output, gathered at home from the bf16 embedding: each token's row,
  // in token order, into embed_in_.
  void GatherEmbeddingRows(engine::ThreadPool& pool) {
    const int64_t h = c_.hidden_size;
    const uint16_t* table = host_[EmbedGroup()].param.as<uint16_t>();
    uint16_t* out = embed_in_.as<uint16_t>();
    pool.ParallelFor(A_ * n_, 256, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        std::memcpy(out + t * h, table + static_cast<int64_t>(host_ids_[t]) * h, 2 * h);
      }
    });
  }

  // Adds each token's input gradient (embed_dx_, bf16) into its embedding row of the host
  // gradient `grad` ([vocab, hidden] fp32); threads split the columns, so no two write the
  // same element.
  void AddEmbeddingGradient(engine::ThreadPool& pool, float* grad) const {
    const int64_t h = c_.hidden_size, tokens = A_ * n_;
    const uint16_t* dx = embed_dx_.as<uint16_t>();
    pool.ParallelFor(h, 64, [&](int64_t b, int64_t e) {
      for (int64_t t = 0; t < tokens; ++t) {
        float* row = grad + static_cast<int64_t>(host_ids_[t]) * h;
        const uint16_t* d = dx + t * h;
        for (int64_t j = b; j < e; ++j) row[j] += FromBf16Bits(d[j]);
      }
    });
  }

  absl::Status Step(int64_t step) {
    const int64_t h = c_.hidden_size;
    cudaStream_t cs = dev_->compute_stream(), h2d = dev_->h2d_stream(),
                 d2h = dev_->d2h_stream();
    const int32_t* in = ids_.as<int32_t>();
    const int32_t* tg = in + A_ * n_;
    // Forward: the embedding rows of the step's tokens, gathered at home when the previous
    // step's embedding update of those rows was done.
    if (embed_rows_done_.valid()) {
      const auto t0 = std::chrono::steady_clock::now();
      embed_rows_done_.wait();
      wait_big_s_ += Seconds(t0);
    }
    WaitOptimizer(NormGroup());
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(norm_param_.get(), host_[NormGroup()].param.get(), 2 * h,
                                         cudaMemcpyHostToDevice, h2d),
                         "offload: fetch norm");
    RETURN_IF_ERROR(ev_norm_ready_.Record(h2d, "offload: fetch norm"));
    int cur = 0;
    RETURN_IF_ERROR(ev_act_saved_[cur].StreamWait(cs, "offload: embed"));
    // On the compute stream: ordered after the previous step's uses of the activations.
    // Issued before layer 0's fetch, which waits for layer 0's AdamW.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Act(cur, 0), embed_in_.get(), 2 * A_ * n_ * h,
                                         cudaMemcpyHostToDevice, cs),
                         "offload: embedding rows");
    h2d_ += 2 * A_ * n_ * h;
    RETURN_IF_ERROR(FetchLayer(0));
    const bool tied = c_.tie_word_embeddings;
    if (!tied) RETURN_IF_ERROR(FetchBig(HeadGroup()));
    // Forward: layers, saving each layer's input for the backward.
    for (int64_t l = 0; l < L_; ++l) {
      RETURN_IF_ERROR(ev_mark_.Record(cs, "offload: checkpoint"));
      RETURN_IF_ERROR(ev_mark_.StreamWait(d2h, "offload: checkpoint"));
      for (int64_t a = 0; a < A_; ++a) {
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Ckpt(l, a), Act(cur, a), 2 * n_ * h,
                                             cudaMemcpyDeviceToHost, d2h),
                             "offload: save checkpoint");
      }
      d2h_ += 2 * A_ * n_ * h;
      RETURN_IF_ERROR(ev_act_saved_[cur].Record(d2h, "offload: checkpoint"));
      if (l + 1 < L_) RETURN_IF_ERROR(FetchLayer(l + 1));
      // Tied, the head is the embedding, whose last rows are updated after layer 0's AdamW:
      // fetch it while the device runs the last layers.
      if (tied && l == std::max<int64_t>(0, L_ - 2)) RETURN_IF_ERROR(FetchBig(HeadGroup()));
      const int s = static_cast<int>(l % 2);
      RETURN_IF_ERROR(ev_slot_ready_[s].StreamWait(cs, "offload: forward"));
      RETURN_IF_ERROR(ev_act_saved_[1 - cur].StreamWait(cs, "offload: forward"));
      model_->BindLayer(static_cast<int>(l), LayerView{param_slot_[s].as<bf16>(), nullptr});
      for (int64_t a = 0; a < A_; ++a) {
        RETURN_IF_ERROR(model_->DecoderLayerForward(static_cast<int>(l), Act(cur, a),
                                                    Act(1 - cur, a), a_.batch, a_.seq));
      }
      RETURN_IF_ERROR(ev_slot_free_[s].Record(cs, "offload: forward"));
      cur = 1 - cur;
    }
    // Head (forward and backward) without its weight gradient; dy goes to the other
    // activation set, the normed input replaces the head's input (which is not needed again).
    RETURN_IF_ERROR(ev_big_param_ready_.StreamWait(cs, "offload: head"));
    RETURN_IF_ERROR(ev_norm_ready_.StreamWait(cs, "offload: head"));
    RETURN_IF_ERROR(ev_act_saved_[1 - cur].StreamWait(cs, "offload: head"));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(norm_grad_.get(), 0, 4 * h, cs), "offload");
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(loss_sum_.get(), 0, 8, cs), "offload");
    if (tied) {
      model_->BindEmbedding(big_param_.as<bf16>(), nullptr);
      model_->BindHead(norm_param_.as<bf16>(), norm_grad_.as<float>(), nullptr, nullptr);
    } else {
      model_->BindHead(norm_param_.as<bf16>(), norm_grad_.as<float>(), big_param_.as<bf16>(),
                       nullptr);
    }
    const float micro_scale = 1.0f / static_cast<float>(A_);
    float* lse = lse_.as<float>();
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(model_->HeadForwardBackwardNoWeightGrad(
          Act(cur, a), tg + a * n_, a_.batch, a_.seq, micro_scale, Act(1 - cur, a),
          loss_sum_.as<double>(), Act(cur, a), lse + a * n_));
    }
    // The head's weight gradient, a block of vocabulary rows at a time, each sent home into
    // the group's host gradient while the next is made.
    const size_t head = HeadGroup();
    const int64_t V = c_.vocab_size, vb = BlockRows();
    for (int64_t j = 0, v0 = 0; v0 < V; ++j, v0 += vb) {
      const int64_t rows = std::min(vb, V - v0);
      const int k = static_cast<int>(j % 2);
      RETURN_IF_ERROR(ev_block_saved_[k].StreamWait(cs, "offload: head gradient"));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(block_grad_[k].get(), 0, 4 * rows * h, cs),
                           "offload: head gradient");
      for (int64_t a = 0; a < A_; ++a) {
        RETURN_IF_ERROR(model_->HeadWeightGradRows(Act(cur, a), tg + a * n_, lse + a * n_,
                                                   a_.batch, a_.seq, micro_scale,
                                                   big_param_.as<bf16>() + v0 * h, v0, rows,
                                                   block_grad_[k].as<float>()));
      }
      RETURN_IF_ERROR(CopyHome(host_[head].grad.as<float>() + v0 * h, block_grad_[k].get(),
                               4 * rows * h, &ev_block_saved_[k],
                               "offload: head gradient block"));
    }
    RETURN_IF_ERROR(ev_big_param_free_.Record(cs, "offload: head"));
    // Tied: the embedding's gradient is added to these rows at the end of the backward.
    if (!tied) RETURN_IF_ERROR(QueueOptimizer(head, step));
    RETURN_IF_ERROR(SaveGrads(NormGroup(), norm_grad_.get(), nullptr, step));
    int dcur = 1 - cur;
    // Backward, recomputing each layer from its checkpoint.
    int64_t idx = 0;
    auto fetch_ckpt = [&](int64_t i) -> absl::Status {
      if (i >= L_ * A_) return absl::OkStatus();
      const int64_t l = L_ - 1 - i / A_, a = i % A_;
      const int k = static_cast<int>(i % 2);
      RETURN_IF_ERROR(ev_x_free_[k].StreamWait(h2d, "offload: fetch checkpoint"));
      RETURN_IF_ERROR(ev_act_saved_[0].StreamWait(h2d, "offload: fetch checkpoint"));
      RETURN_IF_ERROR(ev_act_saved_[1].StreamWait(h2d, "offload: fetch checkpoint"));
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(xslot_[k].get(), Ckpt(l, a), 2 * n_ * h,
                                           cudaMemcpyHostToDevice, h2d),
                           "offload: fetch checkpoint");
      h2d_ += 2 * n_ * h;
      return ev_x_ready_[k].Record(h2d, "offload: fetch checkpoint");
    };
    RETURN_IF_ERROR(fetch_ckpt(0));
    for (int64_t l = L_ - 1; l >= 0; --l) {
      RETURN_IF_ERROR(FetchLayer(l));
      if (l > 0) RETURN_IF_ERROR(FetchLayer(l - 1));
      const int s = static_cast<int>(l % 2), k = static_cast<int>(l % 2);
      RETURN_IF_ERROR(ev_grad_saved_[k].StreamWait(cs, "offload: backward"));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(grad_slot_[k].get(), 0, 4 * shapes_[l].elems, cs),
                           "offload: backward");
      RETURN_IF_ERROR(ev_slot_ready_[s].StreamWait(cs, "offload: backward"));
      model_->BindLayer(static_cast<int>(l),
                        LayerView{param_slot_[s].as<bf16>(), grad_slot_[k].as<float>()});
      for (int64_t a = 0; a < A_; ++a, ++idx) {
        RETURN_IF_ERROR(fetch_ckpt(idx + 1));
        const int x = static_cast<int>(idx % 2);
        RETURN_IF_ERROR(ev_x_ready_[x].StreamWait(cs, "offload: backward"));
        RETURN_IF_ERROR(model_->DecoderLayerBackward(static_cast<int>(l), xslot_[x].as<bf16>(),
                                                     Act(dcur, a), Act(1 - dcur, a), a_.batch,
                                                     a_.seq));
        RETURN_IF_ERROR(ev_x_free_[x].Record(cs, "offload: backward"));
      }
      RETURN_IF_ERROR(ev_slot_free_[s].Record(cs, "offload: backward"));
      // Layer 0's AdamW is queued after the embedding rows' (below): the next step needs them
      // first.
      RETURN_IF_ERROR(SaveGrads(l, grad_slot_[k].get(), &ev_grad_saved_[k], step, l > 0));
      dcur = 1 - dcur;
    }
    // Embedding backward at home: every token's input gradient goes home, and the optimizer's
    // threads add it into the embedding rows of the group's host gradient (tied: onto the
    // head's gradient blocks, which arrived before it on the same copy stream) before AdamW.
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(CopyHome(embed_dx_.as<uint16_t>() + a * n_ * h, Act(dcur, a), 2 * n_ * h,
                               nullptr, "offload: embedding input gradient"));
    }
    const size_t embed = EmbedGroup();
    float* embed_grad = host_[embed].grad.as<float>();
    RETURN_IF_ERROR(
        QueueOptimizer(embed, step, [this, tied, embed_grad, h](engine::ThreadPool& pool) {
          // Untied, the gradient holds only the embedding's: the rows of the step's tokens
          // (the bench's ids are the same every step; the other rows stay zero from Setup).
          if (!tied) {
            pool.ParallelFor(static_cast<int64_t>(embed_rows_.size()), 64,
                             [&](int64_t b, int64_t e) {
                               for (int64_t i = b; i < e; ++i) {
                                 std::fill_n(embed_grad + embed_rows_[i] * h, h, 0.0f);
                               }
                             });
          }
          AddEmbeddingGradient(pool, embed_grad);
        },
        [this](engine::ThreadPool& pool) { GatherEmbeddingRows(pool); }, &embed_rows_shape_,
        &embed_rows_done_));
    RETURN_IF_ERROR(QueueOptimizer(0, step));
    RETURN_IF_ERROR(QueueOptimizer(embed, step, nullptr, nullptr, &embed_rest_shape_));
    return absl::OkStatus();
  }

  // The mean token loss of the last step (after Finish).
  absl::StatusOr<double> ReadLoss() {
    double loss_sum = 0;
    CUDA_RETURN_IF_ERROR(cudaMemcpy(&loss_sum, loss_sum_.get(), 8, cudaMemcpyDeviceToHost),
                         "read loss");
    return loss_sum / static_cast<double>(A_ * n_);
  }

  absl::Status Finish() {
    RETURN_IF_ERROR(dev_->SynchronizeAll("offload: finish"));
    for (auto& f : done_) {
      if (f.valid()) f.wait();
    }
    if (embed_rows_done_.valid()) embed_rows_done_.wait();
    return absl::OkStatus();
  }

  const Args a_;
  const engine::ModelConfig c_;
  const std::vector<TensorGroupShape> shapes_;
  const int64_t L_, n_, A_;
  std::unique_ptr<CudaDevice> dev_;
  std::unique_ptr<CudaLlama> model_;
  DeviceBuffer param_slot_[2], grad_slot_[2], act_[2], xslot_[2];
  DeviceBuffer big_param_, block_grad_[2], lse_, norm_param_, norm_grad_, ids_, loss_sum_;
  std::vector<HostGroup> host_;
  std::vector<int32_t> host_ids_;    // the input ids of every micro-batch
  std::vector<int64_t> embed_rows_;  // the distinct ones
  // The segments of the embedding's AdamW jobs: the rows of embed_rows_, and the others.
  TensorGroupShape embed_rows_shape_, embed_rest_shape_;
  std::shared_future<void> embed_rows_done_;
  PinnedBuffer ckpt_, embed_dx_, embed_in_;
  Event ev_slot_ready_[2], ev_slot_free_[2], ev_act_saved_[2], ev_grad_saved_[2];
  Event ev_x_ready_[2], ev_x_free_[2];
  Event ev_big_param_ready_, ev_big_param_free_, ev_block_saved_[2], ev_norm_ready_, ev_mark_;
  std::unique_ptr<HostOptimizer> optimizer_;
  std::vector<std::shared_future<void>> done_;
  int64_t slot_holds_[2] = {-1, -1};
  std::map<int64_t, bool> params_stale_;
  int64_t h2d_ = 0, d2h_ = 0;
  double wait_layers_s_ = 0, wait_big_s_ = 0;
};

int Main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, &a)) {
    std::fprintf(stderr, "usage: gpu_bench --name=N "
                         "--mode=memory|memory_recompute|offload|kernels|sizes "
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
  if (a.mode == "offload") {
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
      "\"oversubscription_params_optimizer\":%.2f}\n",
      head.c_str(), prop.name, r->step_s, tps, fpt, peak,
      peak > 0 ? absl::StrFormat("%.4f", fpt * tps / peak).c_str() : "null", r->loss_first,
      r->loss,
      static_cast<long long>(r->budget), static_cast<long long>(r->peak),
      static_cast<long long>(r->state_bytes),
      static_cast<double>(r->state_bytes) / static_cast<double>(r->budget),
      static_cast<long long>(r->min_working_set), static_cast<long long>(r->h2d_bytes),
      static_cast<long long>(r->d2h_bytes), r->wait_layers_s, r->wait_big_s,
      static_cast<double>(ResidentState::Bytes(c)) / static_cast<double>(r->budget));
  return 0;
}

}  // namespace
}  // namespace lumen::cuda

int main(int argc, char** argv) { return lumen::cuda::Main(argc, argv); }
