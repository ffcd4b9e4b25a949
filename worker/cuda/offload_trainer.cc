#include "worker/cuda/offload_trainer.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/kernels.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {

// Runs host jobs in submission order on one thread that splits each over a ThreadPool; a job
// starts once its CUDA event (the copies home it reads) has completed.
class HostOptimizer {
 public:
  using Work = std::function<void(engine::ThreadPool&)>;
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
  // The first job skipped because its gradients' event failed; OK when none was.
  absl::Status error() {
    std::lock_guard<std::mutex> l(mu_);
    return error_;
  }
  // `front`: ahead of every job not yet started.
  std::shared_future<void> Submit(cudaEvent_t ready, Work work, bool front = false) {
    Job job{ready, std::move(work), std::promise<void>()};
    std::shared_future<void> f = job.done.get_future().share();
    {
      std::lock_guard<std::mutex> l(mu_);
      if (front) {
        jobs_.push_front(std::move(job));
      } else {
        jobs_.push_back(std::move(job));
      }
    }
    cv_.notify_all();
    return f;
  }

 private:
  struct Job {
    cudaEvent_t ready;
    Work work;
    std::promise<void> done;
  };
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
      // After a CUDA error the gradients may never have arrived: no update from them.
      const cudaError_t e = job.ready != nullptr ? cudaEventSynchronize(job.ready) : cudaSuccess;
      if (e == cudaSuccess) {
        job.work(pool_);
      } else {
        std::lock_guard<std::mutex> l(mu_);
        if (error_.ok()) {
          error_ = absl::InternalError(absl::StrCat(
              "host optimizer: waiting for gradients: ", cudaGetErrorName(e), ": ",
              cudaGetErrorString(e), " (the update was not applied)"));
        }
      }
      job.done.set_value();
    }
  }

  const int device_;
  engine::ThreadPool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  absl::Status error_;
  std::thread thread_;
};

struct CudaOffloadTrainer::HostGroup {
  PinnedBuffer param, grad;  // bf16 compute copy, fp32 gradient
  std::unique_ptr<float[]> master, m, v;
  Event ready;  // the step's gradients are in `grad`
};

namespace {

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

// kernels::FillNormal's values on the host (the same hash; float math within an ulp or two).
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

CudaLlamaOptions ModelOptions(const CudaOffloadOptions& o) {
  CudaLlamaOptions m;
  m.keep_activations = false;
  m.head_chunk_tokens = o.head_chunk_tokens;
  m.attention = o.attention;
  return m;
}

// Sum of squares of x over `segments`, in fixed chunks summed in order (deterministic whatever
// the threads).
double SumSquares(engine::ThreadPool& pool, const float* x,
                  const std::vector<DeviceTensorGroup::Segment>& segments) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  struct Range {
    int64_t begin, end;
  };
  std::vector<Range> ranges;
  for (const auto& s : segments) {
    for (int64_t b = s.offset; b < s.offset + s.size; b += kChunk) {
      ranges.push_back({b, std::min(b + kChunk, s.offset + s.size)});
    }
  }
  std::vector<double> partial(ranges.size(), 0.0);
  pool.ParallelFor(static_cast<int64_t>(ranges.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double s = 0;
      for (int64_t i = ranges[r].begin; i < ranges[r].end; ++i) s += double{x[i]} * x[i];
      partial[r] = s;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// The distinct rows of `ids`, sorted.
std::vector<int64_t> DistinctRows(const std::vector<int32_t>& ids) {
  std::vector<int64_t> rows(ids.begin(), ids.end());
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

}  // namespace

CudaOffloadTrainer::CudaOffloadTrainer(CudaDevice* device, const engine::ModelConfig& config,
                                       const CudaOffloadOptions& options)
    : device_(device), config_(config), options_(options), shapes_(TensorGroupShapes(config)),
      L_(config.num_hidden_layers), n_(options.batch * options.seq),
      A_(options.micro_batches) {}

CudaOffloadTrainer::~CudaOffloadTrainer() { (void)Flush(); }

absl::StatusOr<int64_t> CudaOffloadTrainer::WorkingSetBytes(const engine::ModelConfig& c,
                                                            const CudaOffloadOptions& o) {
  ASSIGN_OR_RETURN(std::unique_ptr<CudaLlama> model,
                   CudaLlama::Create(nullptr, c, ModelOptions(o)));
  const int64_t h = c.hidden_size, layer = TensorGroupShapes(c)[0].elems;
  const int64_t big = c.vocab_size * h, n = o.batch * o.seq, A = o.micro_batches;
  const int64_t blocks = std::max<int64_t>(1, o.head_blocks);
  const int64_t block_rows = (c.vocab_size + blocks - 1) / blocks;
  const int64_t scratch =
      model->LayerScratchBytes(o.batch, o.seq) + model->HeadScratchBytes(o.batch, o.seq);
  // Parameter and gradient slots of two layers, the embedding or head in bf16, two blocks of
  // the head's gradient, norms, two activation sets of every micro-batch, two checkpoint
  // slots, token ids and log-sum-exps, the loss and norm accumulators, the scratch, and the
  // allocator's 256-byte rounding of each buffer.
  return 2 * 2 * layer + 2 * 4 * layer + 2 * big + 2 * 4 * block_rows * h + 6 * h +
         2 * (2 * A * n * h) + 2 * (2 * n * h) + 8 * A * n + 4 * A * n + 16 + scratch + 64 * 256;
}

int64_t CudaOffloadTrainer::HostBytes(const engine::ModelConfig& c, const CudaOffloadOptions& o) {
  int64_t elems = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(c)) elems += s.elems;
  const int64_t n = o.batch * o.seq, A = o.micro_batches, h = c.hidden_size;
  return elems * (2 + 4 + 3 * 4) + 2 * c.num_hidden_layers * A * n * h + 2 * (2 * A * n * h) +
         8 * A * n;
}

int64_t CudaOffloadTrainer::StateBytes(const engine::ModelConfig& c,
                                       const CudaOffloadOptions& o) {
  return ResidentState::Bytes(c) +
         2 * (c.num_hidden_layers + 1) * o.micro_batches * o.batch * o.seq * c.hidden_size;
}

int64_t CudaOffloadTrainer::BlockRows() const {
  const int64_t blocks = std::max<int64_t>(1, options_.head_blocks);
  return (config_.vocab_size + blocks - 1) / blocks;
}

absl::StatusOr<std::unique_ptr<CudaOffloadTrainer>> CudaOffloadTrainer::Create(
    CudaDevice* device, const engine::ModelConfig& config, const CudaOffloadOptions& options) {
  RETURN_IF_ERROR(engine::CheckModelConfig(config));
  if (options.batch <= 0 || options.seq <= 0 || options.micro_batches <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offload: batch ", options.batch, ", seq ", options.seq, " and micro_batches ",
        options.micro_batches, " must be positive"));
  }
  std::unique_ptr<CudaOffloadTrainer> t(new CudaOffloadTrainer(device, config, options));
  RETURN_IF_ERROR(device->MakeCurrent("offload trainer"));
  RETURN_IF_ERROR(t->Allocate());
  return t;
}

absl::Status CudaOffloadTrainer::Allocate() {
  const int64_t h = config_.hidden_size, layer = shapes_[0].elems;
  const int64_t big = config_.vocab_size * h;
  CudaDevice* dev = device_;
  ASSIGN_OR_RETURN(model_, CudaLlama::Create(dev, config_, ModelOptions(options_)));
  for (int i = 0; i < 2; ++i) {
    ASSIGN_OR_RETURN(param_slot_[i], dev->Allocate(2 * layer, "offload: layer parameter slot"));
    ASSIGN_OR_RETURN(grad_slot_[i], dev->Allocate(4 * layer, "offload: layer gradient slot"));
    ASSIGN_OR_RETURN(act_[i], dev->Allocate(2 * A_ * n_ * h, "offload: activations"));
    ASSIGN_OR_RETURN(xslot_[i], dev->Allocate(2 * n_ * h, "offload: checkpoint slot"));
    ASSIGN_OR_RETURN(block_grad_[i],
                     dev->Allocate(4 * BlockRows() * h, "offload: head gradient block"));
  }
  ASSIGN_OR_RETURN(big_param_, dev->Allocate(2 * big, "offload: embedding/head parameters"));
  ASSIGN_OR_RETURN(lse_, dev->Allocate(4 * A_ * n_, "offload: log-sum-exps"));
  ASSIGN_OR_RETURN(norm_param_, dev->Allocate(2 * h, "offload: norm"));
  ASSIGN_OR_RETURN(norm_grad_, dev->Allocate(4 * h, "offload: norm gradient"));
  ASSIGN_OR_RETURN(ids_, dev->Allocate(8 * A_ * n_, "offload: token ids"));
  ASSIGN_OR_RETURN(loss_sum_, dev->Allocate(8, "offload: loss"));
  ASSIGN_OR_RETURN(norm_acc_, dev->Allocate(8, "offload: gradient norm"));
  RETURN_IF_ERROR(model_->EnsureScratch(options_.batch, options_.seq));
  // Host side: pinned where the copy engines read or write, pageable for what only the host
  // optimizer touches.
  const int threads = options_.threads > 0 ? options_.threads : UsableCpus();
  engine::ThreadPool init_pool(threads);
  host_.resize(shapes_.size());
  for (size_t g = 0; g < shapes_.size(); ++g) {
    HostGroup& hg = host_[g];
    const int64_t e = shapes_[g].elems;
    ASSIGN_OR_RETURN(hg.param, dev->AllocatePinned(2 * e, "offload: host parameters"));
    ASSIGN_OR_RETURN(hg.grad, dev->AllocatePinned(4 * e, "offload: host gradients"));
    hg.master.reset(new float[e]);
    hg.m.reset(new float[e]);
    hg.v.reset(new float[e]);
    // Filled by the pool: a single-threaded fill of tens of GB takes tens of seconds.
    float* gr = hg.grad.as<float>();
    uint16_t* pb = hg.param.as<uint16_t>();
    init_pool.ParallelFor(e, 1 << 20, [&](int64_t b, int64_t en) {
      std::fill(hg.master.get() + b, hg.master.get() + en, 0.0f);
      std::fill(hg.m.get() + b, hg.m.get() + en, 0.0f);
      std::fill(hg.v.get() + b, hg.v.get() + en, 0.0f);
      std::fill(gr + b, gr + en, 0.0f);
      std::fill(pb + b, pb + en, uint16_t{0});
    });
    ASSIGN_OR_RETURN(hg.ready, Event::Create("offload: group event"));
  }
  ASSIGN_OR_RETURN(ckpt_, dev->AllocatePinned(2 * L_ * A_ * n_ * h, "offload: checkpoints"));
  ASSIGN_OR_RETURN(embed_dx_, dev->AllocatePinned(2 * A_ * n_ * h, "offload: embedding dx"));
  ASSIGN_OR_RETURN(embed_in_, dev->AllocatePinned(2 * A_ * n_ * h, "offload: embedding rows"));
  ASSIGN_OR_RETURN(ids_host_, dev->AllocatePinned(8 * A_ * n_, "offload: token ids"));
  for (Event* e : {&ev_slot_ready_[0], &ev_slot_ready_[1], &ev_slot_free_[0], &ev_slot_free_[1],
                   &ev_act_saved_[0], &ev_act_saved_[1], &ev_grad_saved_[0], &ev_grad_saved_[1],
                   &ev_x_ready_[0], &ev_x_ready_[1], &ev_x_free_[0], &ev_x_free_[1],
                   &ev_big_param_ready_, &ev_big_param_free_, &ev_block_saved_[0],
                   &ev_block_saved_[1], &ev_norm_ready_, &ev_mark_}) {
    ASSIGN_OR_RETURN(*e, Event::Create("offload: events"));
  }
  optimizer_ = std::make_unique<HostOptimizer>(dev->device_index(), threads);
  done_.resize(shapes_.size());
  return absl::OkStatus();
}

absl::Status CudaOffloadTrainer::CopyGroups(engine::ModelParams* p, bool to_host_state,
                                            int which) {
  RETURN_IF_ERROR(Flush());
  if (!to_host_state && p->layers.size() != static_cast<size_t>(L_)) {
    *p = engine::AllocateParams<float>(config_);
  }
  for (size_t g = 0; g < shapes_.size(); ++g) {
    HostGroup& hg = host_[g];
    float* flat = which == 0 ? hg.master.get() : which == 1 ? hg.m.get() : hg.v.get();
    RETURN_IF_ERROR(CopyGroupTensors(config_, p, g, flat, to_host_state));
  }
  return absl::OkStatus();
}

absl::Status CudaOffloadTrainer::SetParams(const engine::ModelParams& params) {
  auto* p = const_cast<engine::ModelParams*>(&params);  // only read: to_host_state
  RETURN_IF_ERROR(CopyGroups(p, true, 0));
  engine::ThreadPool pool(options_.threads > 0 ? options_.threads : UsableCpus());
  for (size_t g = 0; g < shapes_.size(); ++g) {
    HostGroup& hg = host_[g];
    uint16_t* pb = hg.param.as<uint16_t>();
    pool.ParallelFor(shapes_[g].elems, 1 << 16, [&](int64_t b, int64_t e) {
      std::fill(hg.m.get() + b, hg.m.get() + e, 0.0f);
      std::fill(hg.v.get() + b, hg.v.get() + e, 0.0f);
      for (int64_t i = b; i < e; ++i) pb[i] = ToBf16Bits(hg.master[i]);
    });
  }
  for (int64_t l = 0; l < L_; ++l) params_stale_[l] = true;
  gathered_for_.clear();
  return absl::OkStatus();
}

absl::Status CudaOffloadTrainer::InitRandom(uint64_t seed) {
  RETURN_IF_ERROR(Flush());
  engine::ThreadPool pool(options_.threads > 0 ? options_.threads : UsableCpus());
  for (size_t g = 0; g < shapes_.size(); ++g) {
    HostGroup& hg = host_[g];
    for (const auto& seg : shapes_[g].segments) {
      const uint64_t s = (seed * 1000003 + g) * 1000003 + seg.offset;
      float* p = hg.master.get() + seg.offset;
      pool.ParallelFor(seg.size, 1 << 16, [&](int64_t b, int64_t e) {
        if (seg.matrix) {
          HostFillNormal(p, b, e, s, static_cast<float>(config_.init_std));
        } else {
          std::fill(p + b, p + e, 1.0f);
        }
      });
    }
    uint16_t* pb = hg.param.as<uint16_t>();
    pool.ParallelFor(shapes_[g].elems, 1 << 16, [&](int64_t b, int64_t e) {
      std::fill(hg.m.get() + b, hg.m.get() + e, 0.0f);
      std::fill(hg.v.get() + b, hg.v.get() + e, 0.0f);
      for (int64_t i = b; i < e; ++i) pb[i] = ToBf16Bits(hg.master[i]);
    });
  }
  for (int64_t l = 0; l < L_; ++l) params_stale_[l] = true;
  gathered_for_.clear();
  return absl::OkStatus();
}

absl::Status CudaOffloadTrainer::GetParams(engine::ModelParams* out) {
  return CopyGroups(out, false, 0);
}

absl::Status CudaOffloadTrainer::GetMoments(engine::ModelParams* m, engine::ModelParams* v) {
  RETURN_IF_ERROR(CopyGroups(m, false, 1));
  return CopyGroups(v, false, 2);
}

absl::Status CudaOffloadTrainer::SetMoments(const engine::ModelParams& m,
                                            const engine::ModelParams& v) {
  RETURN_IF_ERROR(CopyGroups(const_cast<engine::ModelParams*>(&m), true, 1));
  return CopyGroups(const_cast<engine::ModelParams*>(&v), true, 2);
}

void CudaOffloadTrainer::WaitOptimizer(size_t g) {
  if (!done_[g].valid()) return;
  const auto t0 = std::chrono::steady_clock::now();
  done_[g].wait();
  (static_cast<int64_t>(g) < L_ ? wait_layers_s_ : wait_big_s_) += Seconds(t0);
}

absl::Status CudaOffloadTrainer::FetchLayer(int64_t l) {
  const int s = static_cast<int>(l % 2);
  if (slot_holds_[s] == l && !params_stale_[l]) return absl::OkStatus();
  cudaStream_t h2d = device_->h2d_stream();
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

absl::Status CudaOffloadTrainer::FetchBig(size_t g) {
  cudaStream_t h2d = device_->h2d_stream();
  RETURN_IF_ERROR(ev_big_param_free_.StreamWait(h2d, "offload: fetch embedding/head"));
  WaitOptimizer(g);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(big_param_.get(), host_[g].param.get(),
                                       2 * shapes_[g].elems, cudaMemcpyHostToDevice, h2d),
                       "offload: fetch embedding/head");
  h2d_ += 2 * shapes_[g].elems;
  return ev_big_param_ready_.Record(h2d, "offload: fetch embedding/head");
}

bf16* CudaOffloadTrainer::Act(int set, int64_t a) const {
  return act_[set].as<bf16>() + a * n_ * config_.hidden_size;
}

bf16* CudaOffloadTrainer::Ckpt(int64_t l, int64_t a) const {
  return ckpt_.as<bf16>() + (l * A_ + a) * n_ * config_.hidden_size;
}

absl::Status CudaOffloadTrainer::CopyHome(void* dst, const void* src, int64_t bytes, Event* saved,
                                          const std::string& op) {
  cudaStream_t d2h = device_->d2h_stream();
  RETURN_IF_ERROR(ev_mark_.Record(device_->compute_stream(), op));
  RETURN_IF_ERROR(ev_mark_.StreamWait(d2h, op));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, d2h), op);
  d2h_ += bytes;
  if (saved != nullptr) RETURN_IF_ERROR(saved->Record(d2h, op));
  return absl::OkStatus();
}

absl::Status CudaOffloadTrainer::MarkGradsHome(size_t g) {
  return host_[g].ready.Record(device_->d2h_stream(), "offload: gradients");
}

void CudaOffloadTrainer::QueueAdamW(size_t g, const engine::AdamWHyper& hyper, int64_t step,
                                    float coef, const TensorGroupShape* segments,
                                    std::shared_future<void>* done,
                                    std::function<void(engine::ThreadPool&)> after) {
  HostGroup* hg = &host_[g];
  // A copy: the step's row segments are rebuilt by the next step while this may still wait.
  auto shape = std::make_shared<const TensorGroupShape>(segments != nullptr ? *segments
                                                                            : shapes_[g]);
  auto work = [hg, shape, hyper, step, coef, after](engine::ThreadPool& pool) {
    auto update = [&](const DeviceTensorGroup::Segment& seg, int64_t b, int64_t e) {
      engine::AdamWHyper h = hyper;
      if (!seg.matrix) h.weight_decay = 0;
      const int64_t o = seg.offset;
      float* grad = hg->grad.as<float>();
      if (coef != 1.0f) {
        for (int64_t i = o + b; i < o + e; ++i) grad[i] *= coef;
      }
      engine::AdamWUpdate(hg->master.get() + o + b, grad + o + b, hg->m.get() + o + b,
                          hg->v.get() + o + b, e - b, h, step);
      uint16_t* pb = hg->param.as<uint16_t>();
      for (int64_t i = o + b; i < o + e; ++i) pb[i] = ToBf16Bits(hg->master[i]);
    };
    const std::vector<DeviceTensorGroup::Segment>& segs = shape->segments;
    if (segs.size() > 64) {
      // The embedding's runs of token rows: thousands of short segments, split by segment (one
      // ParallelFor each would run most of them on this thread alone).
      pool.ParallelFor(static_cast<int64_t>(segs.size()), 1, [&](int64_t sb, int64_t se) {
        for (int64_t i = sb; i < se; ++i) update(segs[i], 0, segs[i].size);
      });
    } else {
      for (const DeviceTensorGroup::Segment& seg : segs) {
        pool.ParallelFor(seg.size, 1 << 16, [&](int64_t b, int64_t e) { update(seg, b, e); });
      }
    }
    if (after) after(pool);
  };
  *(done != nullptr ? done : &done_[g]) = optimizer_->Submit(hg->ready.get(), std::move(work));
  if (static_cast<int64_t>(g) < L_) params_stale_[g] = true;
}

void CudaOffloadTrainer::GatherEmbeddingRows(const std::vector<int32_t>& ids,
                                             engine::ThreadPool* pool) {
  const int64_t h = config_.hidden_size;
  const uint16_t* table = host_[EmbedGroup()].param.as<uint16_t>();
  uint16_t* out = embed_in_.as<uint16_t>();
  auto gather = [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      std::memcpy(out + t * h, table + static_cast<int64_t>(ids[t]) * h, 2 * h);
    }
  };
  if (pool != nullptr) {
    pool->ParallelFor(static_cast<int64_t>(ids.size()), 256, gather);
  } else {
    gather(0, static_cast<int64_t>(ids.size()));
  }
}

void CudaOffloadTrainer::QueueEmbeddingRows(const engine::AdamWHyper& hyper, int64_t step,
                                            float coef, const std::vector<int32_t>& next) {
  const size_t embed = EmbedGroup();
  const int64_t h = config_.hidden_size, V = config_.vocab_size;
  embed_rows_shape_.segments.clear();
  embed_rest_shape_.segments.clear();
  if (next.empty()) {  // the next step's rows are unknown: the whole table, gathered next step
    gathered_for_.clear();
    QueueAdamW(embed, hyper, step, coef);
    return;
  }
  const std::vector<int64_t> rows = DistinctRows(next);
  int64_t next_row = 0;
  for (size_t i = 0; i < rows.size();) {
    size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;
    const int64_t first = rows[i], count = static_cast<int64_t>(j - i);
    if (first > next_row) {
      embed_rest_shape_.segments.push_back({next_row * h, (first - next_row) * h, true});
    }
    embed_rows_shape_.segments.push_back({first * h, count * h, true});
    next_row = first + count;
    i = j;
  }
  if (next_row < V) embed_rest_shape_.segments.push_back({next_row * h, (V - next_row) * h, true});
  gathered_for_ = next;
  auto ids = std::make_shared<const std::vector<int32_t>>(next);
  QueueAdamW(embed, hyper, step, coef, &embed_rows_shape_, &embed_rows_done_,
             [this, ids](engine::ThreadPool& pool) { GatherEmbeddingRows(*ids, &pool); });
  done_[embed] = embed_rows_done_;
}

void CudaOffloadTrainer::QueueEmbeddingRest(const engine::AdamWHyper& hyper, int64_t step,
                                            float coef) {
  if (!embed_rest_shape_.segments.empty()) {
    QueueAdamW(EmbedGroup(), hyper, step, coef, &embed_rest_shape_);
  }
}

absl::StatusOr<CudaOffloadStepResult> CudaOffloadTrainer::Step(
    const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets,
    const std::vector<int32_t>& next_inputs, const engine::AdamWHyper& hyper,
    double max_grad_norm, int64_t step) {
  RETURN_IF_ERROR(device_->MakeCurrent("offload step"));
  const int64_t h = config_.hidden_size, total = A_ * n_;
  if (static_cast<int64_t>(inputs.size()) != total ||
      static_cast<int64_t>(targets.size()) != total ||
      (!next_inputs.empty() && static_cast<int64_t>(next_inputs.size()) != total)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offload step: want ", A_, " x ", n_, " ids, got ", inputs.size(), " inputs, ",
        targets.size(), " targets and ", next_inputs.size(), " next inputs"));
  }
  const int64_t vocab = config_.vocab_size;
  RETURN_IF_ERROR(CheckTokenIds(inputs, vocab, "inputs"));
  RETURN_IF_ERROR(CheckTokenIds(targets, vocab, "targets"));
  RETURN_IF_ERROR(CheckTokenIds(next_inputs, vocab, "next inputs"));
  const bool overlap = max_grad_norm <= 0;  // no clipping: AdamW need not wait for the norm
  h2d_ = d2h_ = 0;
  wait_layers_s_ = wait_big_s_ = 0;
  cudaStream_t cs = device_->compute_stream(), h2d = device_->h2d_stream();
  // The pinned staging may still feed the upload of a step that failed after queuing it, and
  // that step's embedding-gradient job may still be queued.
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cs), "offload step: wait for the previous step");
  if (embed_grad_done_.valid()) embed_grad_done_.wait();
  std::memcpy(ids_host_.get(), inputs.data(), 4 * total);
  std::memcpy(ids_host_.as<int32_t>() + total, targets.data(), 4 * total);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.get(), ids_host_.get(), 8 * total,
                                       cudaMemcpyHostToDevice, cs),
                       "offload: upload token ids");
  h2d_ += 8 * total;
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(loss_sum_.get(), 0, 8, cs), "offload");
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(norm_acc_.get(), 0, 8, cs), "offload");
  const int32_t* tg = ids_.as<int32_t>() + total;
  // Forward: the embedding rows of the step's tokens, gathered at home once the previous
  // step's update of those rows was done (or now, when it did not know them).
  if (embed_rows_done_.valid()) {
    const auto t0 = std::chrono::steady_clock::now();
    embed_rows_done_.wait();
    wait_big_s_ += Seconds(t0);
  }
  if (gathered_for_ != inputs) {
    WaitOptimizer(EmbedGroup());
    GatherEmbeddingRows(inputs, nullptr);
    gathered_for_ = inputs;
  }
  int cur = 0;
  RETURN_IF_ERROR(ev_act_saved_[cur].StreamWait(cs, "offload: embed"));
  // On the compute stream: ordered after the previous step's uses of the activations. Issued
  // before layer 0's fetch, which waits for layer 0's AdamW.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Act(cur, 0), embed_in_.get(), 2 * total * h,
                                       cudaMemcpyHostToDevice, cs),
                       "offload: embedding rows");
  h2d_ += 2 * total * h;
  RETURN_IF_ERROR(FetchLayer(0));
  const bool tied = config_.tie_word_embeddings;
  // The final norm and the head (tied: the whole embedding, whose other rows are updated after
  // layer 0's AdamW), fetched while the device runs the last two layers: with clipping their
  // AdamW comes after every layer's.
  auto fetch_norm_and_head = [&]() -> absl::Status {
    WaitOptimizer(NormGroup());
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(norm_param_.get(), host_[NormGroup()].param.get(),
                                         2 * h, cudaMemcpyHostToDevice, h2d),
                         "offload: fetch norm");
    h2d_ += 2 * h;
    RETURN_IF_ERROR(ev_norm_ready_.Record(h2d, "offload: fetch norm"));
    return FetchBig(HeadGroup());
  };
  const int64_t B = options_.batch, T = options_.seq;
  cudaStream_t d2h = device_->d2h_stream();
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
    const int s = static_cast<int>(l % 2);
    RETURN_IF_ERROR(ev_slot_ready_[s].StreamWait(cs, "offload: forward"));
    RETURN_IF_ERROR(ev_act_saved_[1 - cur].StreamWait(cs, "offload: forward"));
    model_->BindLayer(static_cast<int>(l), LayerView{param_slot_[s].as<bf16>(), nullptr});
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(
          model_->DecoderLayerForward(static_cast<int>(l), Act(cur, a), Act(1 - cur, a), B, T));
    }
    RETURN_IF_ERROR(ev_slot_free_[s].Record(cs, "offload: forward"));
    // Once this layer's kernels are queued, so the device computes while the host waits.
    if (l == std::max<int64_t>(0, L_ - 2)) RETURN_IF_ERROR(fetch_norm_and_head());
    cur = 1 - cur;
  }
  // Head (forward and backward) without its weight gradient; dy goes to the other activation
  // set, the normed input replaces the head's input (which is not needed again).
  RETURN_IF_ERROR(ev_big_param_ready_.StreamWait(cs, "offload: head"));
  RETURN_IF_ERROR(ev_norm_ready_.StreamWait(cs, "offload: head"));
  RETURN_IF_ERROR(ev_act_saved_[1 - cur].StreamWait(cs, "offload: head"));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(norm_grad_.get(), 0, 4 * h, cs), "offload");
  if (tied) {
    model_->BindEmbedding(big_param_.as<bf16>(), nullptr);
    model_->BindHead(norm_param_.as<bf16>(), norm_grad_.as<float>(), nullptr, nullptr);
  } else {
    model_->BindHead(norm_param_.as<bf16>(), norm_grad_.as<float>(), big_param_.as<bf16>(),
                     nullptr);
  }
  const float micro_scale = static_cast<float>(1.0 / static_cast<double>(A_));
  float* lse = lse_.as<float>();
  double* norm_acc = norm_acc_.as<double>();
  for (int64_t a = 0; a < A_; ++a) {
    RETURN_IF_ERROR(model_->HeadForwardBackwardNoWeightGrad(
        Act(cur, a), tg + a * n_, B, T, micro_scale, Act(1 - cur, a), loss_sum_.as<double>(),
        Act(cur, a), lse + a * n_));
  }
  // The head's weight gradient, a block of vocabulary rows at a time, each sent home into the
  // group's host gradient while the next is made.
  const size_t head = HeadGroup();
  const int64_t V = config_.vocab_size, vb = BlockRows();
  for (int64_t j = 0, v0 = 0; v0 < V; ++j, v0 += vb) {
    const int64_t rows = std::min(vb, V - v0);
    const int k = static_cast<int>(j % 2);
    RETURN_IF_ERROR(ev_block_saved_[k].StreamWait(cs, "offload: head gradient"));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(block_grad_[k].get(), 0, 4 * rows * h, cs),
                         "offload: head gradient");
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(model_->HeadWeightGradRows(Act(cur, a), tg + a * n_, lse + a * n_, B, T,
                                                 micro_scale, big_param_.as<bf16>() + v0 * h, v0,
                                                 rows, block_grad_[k].as<float>()));
    }
    // Tied, the embedding's gradient is added to these rows at home: the norm is taken there.
    if (!tied) {
      RETURN_IF_ERROR(kernels::SumSquares(block_grad_[k].as<float>(), rows * h, norm_acc, cs));
    }
    RETURN_IF_ERROR(CopyHome(host_[head].grad.as<float>() + v0 * h, block_grad_[k].get(),
                             4 * rows * h, &ev_block_saved_[k], "offload: head gradient block"));
  }
  RETURN_IF_ERROR(ev_big_param_free_.Record(cs, "offload: head"));
  if (!tied) {
    RETURN_IF_ERROR(MarkGradsHome(head));
    if (overlap) QueueAdamW(head, hyper, step, 1.0f);
  }
  RETURN_IF_ERROR(kernels::SumSquares(norm_grad_.as<float>(), h, norm_acc, cs));
  RETURN_IF_ERROR(CopyHome(host_[NormGroup()].grad.get(), norm_grad_.get(), 4 * h, nullptr,
                           "offload: norm gradient"));
  RETURN_IF_ERROR(MarkGradsHome(NormGroup()));
  if (overlap) QueueAdamW(NormGroup(), hyper, step, 1.0f);
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
                                                   Act(dcur, a), Act(1 - dcur, a), B, T));
      RETURN_IF_ERROR(ev_x_free_[x].Record(cs, "offload: backward"));
    }
    RETURN_IF_ERROR(ev_slot_free_[s].Record(cs, "offload: backward"));
    RETURN_IF_ERROR(
        kernels::SumSquares(grad_slot_[k].as<float>(), shapes_[l].elems, norm_acc, cs));
    RETURN_IF_ERROR(CopyHome(host_[l].grad.get(), grad_slot_[k].get(), 4 * shapes_[l].elems,
                             &ev_grad_saved_[k], absl::StrCat("offload: gradients of layer ", l)));
    RETURN_IF_ERROR(MarkGradsHome(l));
    // Layer 0's AdamW is queued after the embedding rows' (below): the next step needs them
    // first.
    if (overlap && l > 0) QueueAdamW(l, hyper, step, 1.0f);
    dcur = 1 - dcur;
  }
  // Embedding backward at home: every token's input gradient goes home, and the optimizer's
  // threads add it into the embedding rows of the group's host gradient (tied: onto the head's
  // gradient blocks, which arrived before it on the same copy stream) and take its norm, ahead
  // of every queued AdamW. The previous step's embedding update, which reads that gradient, is
  // done by now (it preceded layer 0's forward, or, tied, the head's fetch).
  WaitOptimizer(EmbedGroup());
  for (int64_t a = 0; a < A_; ++a) {
    RETURN_IF_ERROR(CopyHome(embed_dx_.as<uint16_t>() + a * n_ * h, Act(dcur, a), 2 * n_ * h,
                             nullptr, "offload: embedding input gradient"));
  }
  const size_t embed = EmbedGroup();
  RETURN_IF_ERROR(MarkGradsHome(embed));
  auto ids = std::make_shared<const std::vector<int32_t>>(inputs);
  embed_grad_done_ = optimizer_->Submit(
      host_[embed].ready.get(),
      [this, tied, embed, h, ids](engine::ThreadPool& pool) {
        float* grad = host_[embed].grad.as<float>();
        const std::vector<int64_t> rows = DistinctRows(*ids);
        // Untied, the gradient holds only the embedding's: zero the rows the last step wrote.
        if (!tied) {
          pool.ParallelFor(static_cast<int64_t>(grad_rows_.size()), 64, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) std::fill_n(grad + grad_rows_[i] * h, h, 0.0f);
          });
        }
        // Threads split the columns, so no two write the same element.
        const uint16_t* dx = embed_dx_.as<uint16_t>();
        const int64_t tokens = static_cast<int64_t>(ids->size());
        pool.ParallelFor(h, 64, [&](int64_t b, int64_t e) {
          for (int64_t t = 0; t < tokens; ++t) {
            float* row = grad + static_cast<int64_t>((*ids)[t]) * h;
            const uint16_t* d = dx + t * h;
            for (int64_t j = b; j < e; ++j) row[j] += FromBf16Bits(d[j]);
          }
        });
        if (tied) {
          embed_sumsq_ = SumSquares(pool, grad, shapes_[embed].segments);
        } else {
          std::vector<DeviceTensorGroup::Segment> segs;
          for (int64_t r : rows) segs.push_back({r * h, h, true});
          embed_sumsq_ = SumSquares(pool, grad, segs);
        }
        grad_rows_ = rows;
      },
      /*front=*/true);
  // The loss and the device's part of the norm.
  double loss_sum = 0, device_sumsq = 0;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&loss_sum, loss_sum_.get(), 8, cudaMemcpyDeviceToHost, cs), "read loss");
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&device_sumsq, norm_acc_.get(), 8,
                                       cudaMemcpyDeviceToHost, cs),
                       "read gradient norm");
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cs), absl::StrCat("offload step ", step));
  {
    const auto t0 = std::chrono::steady_clock::now();
    embed_grad_done_.wait();
    wait_big_s_ += Seconds(t0);
  }
  CudaOffloadStepResult r;
  r.loss = loss_sum / static_cast<double>(total);
  r.grad_norm = std::sqrt(device_sumsq + embed_sumsq_);
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
    gathered_for_.clear();
    return absl::FailedPreconditionError(absl::StrCat(
        "loss ", r.loss, ", gradient norm ", r.grad_norm, " (update ", step,
        overlap ? " applied to the layers whose AdamW had started: the weights held now are "
                  "not to be kept)"
                : " not applied: parameters and moments unchanged)"));
  }
  float coef = 1.0f;
  if (max_grad_norm > 0) {
    const double c = max_grad_norm / (r.grad_norm + 1e-6);
    if (c < 1.0) coef = static_cast<float>(c);
  }
  // The updates the next step's forward needs first come first: the embedding rows of its
  // tokens, then layer 0, 1, ..., the norm and head.
  // Without clipping the other layers, the norm and the head are queued already.
  QueueEmbeddingRows(hyper, step, coef, next_inputs);
  QueueAdamW(0, hyper, step, coef);
  if (!overlap) {
    for (int64_t l = 1; l < L_; ++l) QueueAdamW(l, hyper, step, coef);
    QueueAdamW(NormGroup(), hyper, step, coef);
    if (!tied) QueueAdamW(head, hyper, step, coef);
  }
  QueueEmbeddingRest(hyper, step, coef);
  r.bytes_home_to_device = h2d_;
  r.bytes_device_to_home = d2h_;
  r.wait_optimizer_layers_s = wait_layers_s_;
  r.wait_optimizer_embed_head_s = wait_big_s_;
  return r;
}

absl::Status CudaOffloadTrainer::Flush() {
  if (device_ == nullptr) return absl::OkStatus();
  absl::Status s = device_->SynchronizeAll("offload: finish");
  for (auto& f : done_) {
    if (f.valid()) f.wait();
  }
  if (embed_rows_done_.valid()) embed_rows_done_.wait();
  if (embed_grad_done_.valid()) embed_grad_done_.wait();
  if (s.ok() && optimizer_ != nullptr) s = optimizer_->error();
  return s;
}

}  // namespace lumen::cuda
