#include "worker/cuda/host_state.h"

#include <algorithm>
#include <map>
#include <cmath>
#include <cstring>
#include <future>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lumen::cuda {

HostJobQueue::HostJobQueue(int threads, std::function<void()> on_start)
    : pool_(threads), thread_([this, on_start] { Loop(on_start); }) {}

HostJobQueue::~HostJobQueue() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::shared_future<void> HostJobQueue::Submit(Ready ready, Work work, bool front) {
  Job job{std::move(ready), std::move(work), std::promise<void>()};
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

absl::Status HostJobQueue::error() {
  std::lock_guard<std::mutex> l(mu_);
  return error_;
}

void HostJobQueue::Loop(std::function<void()> on_start) {
  if (on_start) on_start();
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [this] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    // When what the job reads never arrived (a CUDA error), nothing is updated from it.
    absl::Status s = job.ready ? job.ready() : absl::OkStatus();
    if (s.ok()) {
      s = job.work(pool_);
    } else {
      s = absl::Status(s.code(), absl::StrCat(s.message(), " (the job did not run)"));
    }
    if (!s.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      if (error_.ok()) error_ = absl::Status(s.code(), absl::StrCat("host job: ", s.message()));
    }
    job.done.set_value();
  }
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

namespace {

// kernels::FillNormal's values [begin, end) on the host (the same hash; float math within an
// ulp or two), value i into out[i - begin].
void HostFillNormal(float* out, int64_t begin, int64_t end, uint64_t seed, float stddev) {
  for (int64_t i = begin; i < end; ++i) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u1 = (static_cast<float>(z >> 40) + 1.0f) * (1.0f / 16777217.0f);
    const float u2 = static_cast<float>((z >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    out[i - begin] = stddev * std::sqrt(-2.0f * std::log(u1)) *
           static_cast<float>(std::cos(M_PI * static_cast<double>(2.0f * u2)));
  }
}

// The distinct rows of `ids`, sorted.
std::vector<int64_t> DistinctRows(const std::vector<int32_t>& ids) {
  std::vector<int64_t> rows(ids.begin(), ids.end());
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

void Zero(engine::ThreadPool& pool, float* x, int64_t n) {
  pool.ParallelFor(n, 1 << 20, [&](int64_t b, int64_t e) { std::fill(x + b, x + e, 0.0f); });
}

// The bf16 copy of n master weights; `pool` may be null (this thread only).
void ToBf16(const float* master, int64_t n, uint16_t* out, engine::ThreadPool* pool) {
  auto convert = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = ToBf16Bits(master[i]);
  };
  if (pool != nullptr) {
    pool->ParallelFor(n, 1 << 16, convert);
  } else {
    convert(0, n);
  }
}

}  // namespace

HostTrainingState::HostTrainingState(const engine::ModelConfig& config,
                                     std::vector<HostGroupBuffers> buffers,
                                     const StateHome& home)
    : config_(config), shapes_(TensorGroupShapes(config)), buffers_(std::move(buffers)),
      home_(home) {}

HostTrainingState::~HostTrainingState() {
  if (home_.home == nullptr || home_.freed_by_owner) return;
  for (size_t g = 0; g < shapes_.size(); ++g) {
    for (int gen = 0; gen < Generations(g); ++gen) {
      for (int64_t c = 0; c < Chunks(g); ++c) {
        for (int which : {0, 1, 2}) (void)home_.home->Free(StateId(which, g, c, gen));
      }
    }
  }
}

int64_t HostTrainingState::OwnBytes(const engine::ModelConfig& config, bool state_at_home,
                                    bool two_generations) {
  const std::vector<TensorGroupShape> shapes = TensorGroupShapes(config);
  int64_t elems = 0, largest = 0;
  for (const TensorGroupShape& s : shapes) {
    elems += s.elems;
    largest = std::max(largest, s.elems);
  }
  if (state_at_home) return 3 * 3 * 4 * std::min(largest, StateHome().chunk_elems);
  return HomeBytes(config, two_generations);  // the same bytes, in this process
}

int64_t HostTrainingState::HomeBytes(const engine::ModelConfig& config, bool two_generations) {
  const std::vector<TensorGroupShape> shapes = TensorGroupShapes(config);
  int64_t elems = 0;
  for (const TensorGroupShape& s : shapes) elems += s.elems;
  const int64_t second = two_generations ? elems - shapes[config.num_hidden_layers].elems : 0;
  return 3 * 4 * (elems + second);
}

absl::StatusOr<std::unique_ptr<HostTrainingState>> HostTrainingState::Create(
    const engine::ModelConfig& config, std::vector<HostGroupBuffers> buffers,
    const StateHome& home, engine::ThreadPool& pool, bool two_generations) {
  RETURN_IF_ERROR(engine::CheckModelConfig(config));
  const size_t groups = TensorGroupShapes(config).size();
  if (buffers.size() != groups) {
    return absl::InvalidArgumentError(absl::StrCat("host state: ", buffers.size(),
                                                   " group buffers for a model of ", groups,
                                                   " tensor groups"));
  }
  for (size_t g = 0; g < groups; ++g) {
    if (buffers[g].param == nullptr || buffers[g].grad == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("host state: group ", g, " has no buffer"));
    }
  }
  const bool at_home = home.home != nullptr;
  if (at_home && home.chunk_elems <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("host state: optimizer state chunk of ", home.chunk_elems, " values"));
  }
  std::unique_ptr<HostTrainingState> s(new HostTrainingState(config, std::move(buffers), home));
  s->two_generations_ = two_generations;
  s->current_.assign(groups, 0);
  int64_t largest = 0;
  for (size_t g = 0; g < groups; ++g) {
    const int64_t e = s->shapes_[g].elems;
    largest = std::max(largest, e);
    // Uninitialised, then filled by the pool: a single-threaded fill of tens of GB takes tens
    // of seconds.
    const int gens = at_home ? 0 : s->Generations(g);
    for (int gen = 0; gen < 2; ++gen) {
      const bool held = gen < gens;
      for (auto* v : {&s->master_[gen], &s->m_[gen], &s->v_[gen]}) {
        v->emplace_back(held ? new float[e] : nullptr);
        if (held) Zero(pool, v->back().get(), e);
      }
    }
    Zero(pool, s->buffers_[g].grad, e);
    uint16_t* pb = s->buffers_[g].param;  // bf16 zeros: the zero master weights', or none yet
    pool.ParallelFor(e, 1 << 20, [pb](int64_t b, int64_t x) { std::fill(pb + b, pb + x, 0); });
  }
  if (at_home) {
    s->slot_elems_ = std::max<int64_t>(1, std::min(largest, home.chunk_elems));
    s->slots_.reset(new float[3 * 3 * s->slot_elems_]);
    s->placed_ = false;
  }
  return s;
}

std::string HostTrainingState::StateId(int which, size_t g, int64_t chunk, int gen) const {
  static const char* const kNames[3] = {"master", "m", "v"};
  return absl::StrCat(home_.prefix, kNames[which], gen == 0 ? "" : "@1", "/", g, "/", chunk);
}

int64_t HostTrainingState::Chunks(size_t g) const {
  return (shapes_[g].elems + home_.chunk_elems - 1) / home_.chunk_elems;
}

absl::Status HostTrainingState::CheckPlaced() const {
  if (placed_) return absl::OkStatus();
  return absl::FailedPreconditionError(
      "host state: no weights in the optimizer state's home yet (SetParams or InitRandom "
      "places them)");
}

absl::Status HostTrainingState::RewriteBf16(size_t g, engine::ThreadPool& pool) {
  uint16_t* pb = buffers_[g].param;
  if (home_.home == nullptr) {
    ToBf16(Master(g, current_[g]), shapes_[g].elems, pb, &pool);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(CheckPlaced());
  const int64_t elems = shapes_[g].elems, chunk = home_.chunk_elems;
  for (int64_t c = 0; c < Chunks(g); ++c) {
    const int64_t lo = c * chunk, n = std::min(chunk, elems - lo);
    RETURN_IF_ERROR(home_.home->Get(StateId(0, g, c, current_[g]), Slot(0, 0), n));
    ToBf16(Slot(0, 0), n, pb + lo, &pool);
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::WriteBf16(engine::ThreadPool& pool) {
  for (size_t g = 0; g < shapes_.size(); ++g) RETURN_IF_ERROR(RewriteBf16(g, pool));
  return absl::OkStatus();
}

absl::Status HostTrainingState::ResetMoments(engine::ThreadPool& pool) {
  for (size_t g = 0; g < shapes_.size(); ++g) {
    const int64_t e = shapes_[g].elems;
    if (home_.home == nullptr) {
      Zero(pool, M(g, current_[g]), e);
      Zero(pool, V(g, current_[g]), e);
      continue;
    }
    const int64_t chunk = std::min(e, home_.chunk_elems);
    float* zeros = Slot(0, 1);
    Zero(pool, zeros, chunk);
    for (int64_t c = 0; c < Chunks(g); ++c) {
      const int64_t n = std::min(chunk, e - c * chunk);
      RETURN_IF_ERROR(home_.home->Put(StateId(1, g, c, current_[g]), zeros, n, home_.tier));
      RETURN_IF_ERROR(home_.home->Put(StateId(2, g, c, current_[g]), zeros, n, home_.tier));
    }
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::SetParams(const engine::ModelParams& params,
                                          engine::ThreadPool& pool) {
  RETURN_IF_ERROR(CopyIn(0, params));  // in a home, with the bf16 copies
  if (home_.home == nullptr) RETURN_IF_ERROR(WriteBf16(pool));
  RETURN_IF_ERROR(ResetMoments(pool));
  placed_ = true;
  return absl::OkStatus();
}

absl::Status HostTrainingState::SetParams(engine::WeightsSource& weights,
                                          engine::ThreadPool& pool, bool zero_moments) {
  const std::map<std::string, size_t> group_of = TensorGroupOf(config_);
  // The groups in the order their tensors come in NamedTensors (the embedding's first), which
  // a source may require (engine::RandomWeights); each group's tensors are contiguous there.
  std::vector<size_t> order;
  {
    engine::ModelParams shapes;
    shapes.layers.resize(config_.num_hidden_layers);
    for (const engine::NamedTensor<float>& t : engine::NamedTensors(config_, &shapes)) {
      const size_t g = group_of.at(t.name);
      if (order.empty() || order.back() != g) order.push_back(g);
    }
  }
  for (size_t g : order) {
    engine::ModelParams one;
    one.layers.resize(config_.num_hidden_layers);
    for (engine::NamedTensor<float>& t : engine::NamedTensors(config_, &one)) {
      if (group_of.at(t.name) != g) continue;
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      t.data->resize(n);
      RETURN_IF_ERROR(weights.Read(t.name, t.data->data()));
    }
    RETURN_IF_ERROR(CopyInGroup(0, g, one));
    if (home_.home == nullptr) RETURN_IF_ERROR(RewriteBf16(g, pool));
  }
  if (zero_moments) RETURN_IF_ERROR(ResetMoments(pool));
  placed_ = true;
  return absl::OkStatus();
}

absl::Status HostTrainingState::InitRandom(uint64_t seed, engine::ThreadPool& pool) {
  const int64_t chunk = home_.home == nullptr ? 0 : home_.chunk_elems;
  for (size_t g = 0; g < shapes_.size(); ++g) {
    // In this process the whole group at once; in a home a chunk at a time, through a slot.
    const int64_t elems = shapes_[g].elems;
    for (int64_t lo = 0; lo < elems; lo += chunk > 0 ? chunk : elems) {
      const int64_t hi = chunk > 0 ? std::min(elems, lo + chunk) : elems;
      float* out = chunk > 0 ? Slot(0, 0) : Master(g, current_[g]);  // out[i - lo]: element i
      if (chunk > 0) std::fill(out, out + (hi - lo), 0.0f);  // the padding between tensors
      for (const GroupSegment& seg : shapes_[g].segments) {
        const int64_t b = std::max(lo, seg.offset), e = std::min(hi, seg.offset + seg.size);
        if (b >= e) continue;
        const uint64_t s = (seed * 1000003 + g) * 1000003 + seg.offset;
        pool.ParallelFor(e - b, 1 << 16, [&](int64_t rb, int64_t re) {
          float* p = out + (b + rb - lo);
          if (seg.matrix) {  // hashed by the index within the segment
            HostFillNormal(p, b - seg.offset + rb, b - seg.offset + re, s,
                           static_cast<float>(config_.init_std));
          } else {
            std::fill(p, p + (re - rb), 1.0f);
          }
        });
      }
      if (chunk == 0) break;
      ToBf16(out, hi - lo, buffers_[g].param + lo, &pool);
      RETURN_IF_ERROR(home_.home->Put(StateId(0, g, lo / chunk, current_[g]), out, hi - lo,
                                        home_.tier));
    }
  }
  if (home_.home == nullptr) RETURN_IF_ERROR(WriteBf16(pool));
  RETURN_IF_ERROR(ResetMoments(pool));
  placed_ = true;
  return absl::OkStatus();
}

absl::Status HostTrainingState::CopyOutGroup(int which, size_t g,
                                             engine::ModelParams* out) const {
  if (g >= shapes_.size()) return absl::InvalidArgumentError(absl::StrCat("no tensor group ", g));
  RETURN_IF_ERROR(CheckPlaced());
  if (out->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    out->layers.resize(config_.num_hidden_layers);
  }
  const int gen = current_[g];
  if (home_.home == nullptr) {
    float* flat = which == 0 ? Master(g, gen) : which == 1 ? M(g, gen) : V(g, gen);
    return CopyGroupTensors(config_, out, g, flat, false);
  }
  // From a home a chunk at a time, through the first slot.
  const int64_t elems = shapes_[g].elems, chunk = home_.chunk_elems;
  for (int64_t c = 0; c < Chunks(g); ++c) {
    const int64_t lo = c * chunk, hi = std::min(elems, lo + chunk);
    RETURN_IF_ERROR(home_.home->Get(StateId(which, g, c, current_[g]), Slot(0, 0), hi - lo));
    RETURN_IF_ERROR(CopyGroupRange(config_, out, g, lo, hi, Slot(0, 0), false));
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::CopyInGroup(int which, size_t g, const engine::ModelParams& in) {
  if (g >= shapes_.size()) return absl::InvalidArgumentError(absl::StrCat("no tensor group ", g));
  auto* p = const_cast<engine::ModelParams*>(&in);  // only read: to_flat
  if (home_.home == nullptr) {
    const int gen = current_[g];
    float* flat = which == 0 ? Master(g, gen) : which == 1 ? M(g, gen) : V(g, gen);
    return CopyGroupTensors(config_, p, g, flat, true);
  }
  if (which != 0) RETURN_IF_ERROR(CheckPlaced());
  const int64_t elems = shapes_[g].elems, chunk = home_.chunk_elems;
  float* slot = Slot(0, 0);
  for (int64_t c = 0; c < Chunks(g); ++c) {
    const int64_t lo = c * chunk, hi = std::min(elems, lo + chunk);
    std::fill(slot, slot + (hi - lo), 0.0f);  // the padding between tensors
    RETURN_IF_ERROR(CopyGroupRange(config_, p, g, lo, hi, slot, true));
    // The master weights' bf16 copy as they pass.
    if (which == 0) ToBf16(slot, hi - lo, buffers_[g].param + lo, nullptr);
    RETURN_IF_ERROR(home_.home->Put(StateId(which, g, c, current_[g]), slot, hi - lo, home_.tier));
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::CopyOut(int which, engine::ModelParams* out) const {
  if (out->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    *out = engine::AllocateParams<float>(config_);
  }
  for (size_t g = 0; g < shapes_.size(); ++g) RETURN_IF_ERROR(CopyOutGroup(which, g, out));
  return absl::OkStatus();
}

absl::Status HostTrainingState::CopyIn(int which, const engine::ModelParams& in) {
  for (size_t g = 0; g < shapes_.size(); ++g) RETURN_IF_ERROR(CopyInGroup(which, g, in));
  return absl::OkStatus();
}

absl::Status HostTrainingState::GetGroup(int which, size_t g, engine::ModelParams* out) const {
  return CopyOutGroup(which, g, out);
}

absl::Status HostTrainingState::SetMomentsGroup(size_t g, const engine::ModelParams& m,
                                                const engine::ModelParams& v) {
  RETURN_IF_ERROR(CopyInGroup(1, g, m));
  return CopyInGroup(2, g, v);
}

absl::Status HostTrainingState::GetParams(engine::ModelParams* out) const {
  return CopyOut(0, out);
}

absl::Status HostTrainingState::GetMoments(engine::ModelParams* m, engine::ModelParams* v) const {
  RETURN_IF_ERROR(CopyOut(1, m));
  return CopyOut(2, v);
}

absl::Status HostTrainingState::SetMoments(const engine::ModelParams& m,
                                           const engine::ModelParams& v) {
  RETURN_IF_ERROR(CopyIn(1, m));
  return CopyIn(2, v);
}

namespace {

// AdamW on n values of one tensor (every pointer at the first of them): the gradients scaled
// by `coef` in a small buffer (the gradients stay as they came, so a dropped update can be
// redone with another coefficient), the master weights and moments, then the bf16 copy.
void UpdateRange(float* master, const float* grad, float* m, float* v, uint16_t* bf16,
                 int64_t n, const engine::AdamWHyper& h, int64_t step, float coef) {
  float scaled[4096];
  for (int64_t c = 0; c < n; c += 4096) {
    const int64_t k = std::min<int64_t>(4096, n - c);
    for (int64_t i = 0; i < k; ++i) scaled[i] = grad[c + i] * coef;
    engine::AdamWUpdate(master + c, scaled, m + c, v + c, k, h, step);
  }
  for (int64_t i = 0; i < n; ++i) bf16[i] = ToBf16Bits(master[i]);
}

engine::AdamWHyper HyperFor(const GroupSegment& seg, engine::AdamWHyper h) {
  if (!seg.matrix) h.weight_decay = 0;
  return h;
}

}  // namespace

absl::Status HostTrainingState::AdamW(size_t g, const std::vector<GroupSegment>* segments,
                                      const engine::AdamWHyper& hyper, int64_t step, float coef,
                                      engine::ThreadPool& pool, int from, int to) {
  const std::vector<GroupSegment>& segs = segments != nullptr ? *segments : shapes_[g].segments;
  if (from < 0) from = current_[g];
  if (to < 0) to = current_[g];
  if (home_.home != nullptr) {
    if (std::max(from, to) >= Generations(g)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "host state: group ", g, " has no generation ", std::max(from, to)));
    }
    RETURN_IF_ERROR(CheckPlaced());
    return HomeAdamW(g, segs, hyper, step, coef, pool, from, to);
  }
  if (Master(g, from) == nullptr || Master(g, to) == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "host state: group ", g, " has no generation ", Master(g, from) == nullptr ? from : to));
  }
  const float *master_in = Master(g, from), *m_in = M(g, from), *v_in = V(g, from);
  float *master = Master(g, to), *m = M(g, to), *v = V(g, to);
  const float* grad = buffers_[g].grad;
  uint16_t* pb = buffers_[g].param;
  auto update = [&](const GroupSegment& seg, int64_t b, int64_t e) {
    const int64_t o = seg.offset + b, n = e - b;
    if (master != master_in) {  // beside the current values: start from a copy of them
      std::memcpy(master + o, master_in + o, 4 * n);
      std::memcpy(m + o, m_in + o, 4 * n);
      std::memcpy(v + o, v_in + o, 4 * n);
    }
    UpdateRange(master + o, grad + o, m + o, v + o, pb + o, n, HyperFor(seg, hyper), step,
                coef);
  };
  if (segs.size() > 64) {
    // The embedding's runs of token rows: thousands of short segments, split by segment (one
    // ParallelFor each would run most of them on this thread alone).
    pool.ParallelFor(static_cast<int64_t>(segs.size()), 1, [&](int64_t sb, int64_t se) {
      for (int64_t i = sb; i < se; ++i) update(segs[i], 0, segs[i].size);
    });
  } else {
    for (const GroupSegment& seg : segs) {
      pool.ParallelFor(seg.size, 1 << 16, [&](int64_t b, int64_t e) { update(seg, b, e); });
    }
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::HomeAdamW(size_t g, const std::vector<GroupSegment>& segs,
                                          const engine::AdamWHyper& hyper, int64_t step,
                                          float coef, engine::ThreadPool& pool, int from,
                                          int to) {
  const int64_t elems = shapes_[g].elems, chunk = home_.chunk_elems, chunks = Chunks(g);
  engine::TensorHome* home = home_.home;
  auto size_of = [&](int64_t c) { return std::min(chunk, elems - c * chunk); };
  // Chunk c (master weights, m and v) of generation `from` is read into slot c % 3 while chunk
  // c - 1 is updated and chunk c - 2 written to generation `to`.
  std::future<absl::Status> reads[3], writes[3];
  auto read = [&](int64_t c) {
    reads[c % 3] = std::async(std::launch::async, [this, home, c, g, from, n = size_of(c)] {
      for (int which : {0, 1, 2}) {
        RETURN_IF_ERROR(home->Get(StateId(which, g, c, from), Slot(c, which), n));
      }
      return absl::OkStatus();
    });
  };
  absl::Status status;
  auto settle = [&status](std::future<absl::Status>& f) {
    if (!f.valid()) return;
    absl::Status s = f.get();
    if (status.ok() && !s.ok()) status = s;
  };
  const float* grad = buffers_[g].grad;
  uint16_t* pb = buffers_[g].param;
  if (chunks > 0) read(0);
  for (int64_t c = 0; c < chunks && status.ok(); ++c) {
    if (c + 1 < chunks) {
      settle(writes[(c + 1) % 3]);  // the slot's last write (chunk c - 2) is done
      if (!status.ok()) break;
      read(c + 1);
    }
    settle(reads[c % 3]);
    if (!status.ok()) break;
    const int64_t lo = c * chunk, hi = lo + size_of(c);
    float *master = Slot(c, 0), *m = Slot(c, 1), *v = Slot(c, 2);  // [i - lo]: element i
    for (const GroupSegment& seg : segs) {
      const int64_t b = std::max(lo, seg.offset), e = std::min(hi, seg.offset + seg.size);
      if (b >= e) continue;
      const engine::AdamWHyper h = HyperFor(seg, hyper);
      pool.ParallelFor(e - b, 1 << 16, [&](int64_t rb, int64_t re) {
        const int64_t i = b + rb;
        UpdateRange(master + (i - lo), grad + i, m + (i - lo), v + (i - lo), pb + i, re - rb, h,
                    step, coef);
      });
    }
    writes[c % 3] = std::async(std::launch::async, [this, home, c, g, to, n = hi - lo] {
      for (int which : {0, 1, 2}) {
        RETURN_IF_ERROR(home->Put(StateId(which, g, c, to), Slot(c, which), n, home_.tier));
      }
      return absl::OkStatus();
    });
  }
  // Nothing may still use the slots when this returns.
  for (int i = 0; i < 3; ++i) {
    settle(reads[i]);
    settle(writes[i]);
  }
  return status;
}

double HostTrainingState::AddEmbeddingGradient(const std::vector<int32_t>& ids,
                                               const uint16_t* dx, engine::ThreadPool& pool) {
  const size_t embed = embed_group();
  const int64_t h = config_.hidden_size;
  float* grad = buffers_[embed].grad;
  const bool tied = config_.tie_word_embeddings;
  const std::vector<int64_t> rows = DistinctRows(ids);
  if (!tied) {
    pool.ParallelFor(static_cast<int64_t>(grad_rows_.size()), 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) std::fill_n(grad + grad_rows_[i] * h, h, 0.0f);
    });
  }
  // Threads split the columns, so no two write the same element; tokens in order.
  const int64_t tokens = static_cast<int64_t>(ids.size());
  pool.ParallelFor(h, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = 0; t < tokens; ++t) {
      float* row = grad + static_cast<int64_t>(ids[t]) * h;
      const uint16_t* d = dx + t * h;
      for (int64_t j = b; j < e; ++j) row[j] += FromBf16Bits(d[j]);
    }
  });
  grad_rows_ = rows;
  if (tied) return SumSquares(pool, grad, shapes_[embed].segments);
  std::vector<GroupSegment> segs;
  segs.reserve(rows.size());
  for (int64_t r : rows) segs.push_back({r * h, h, true});
  return SumSquares(pool, grad, segs);
}

void HostTrainingState::GatherEmbeddingRows(const std::vector<int32_t>& ids, uint16_t* out,
                                            engine::ThreadPool* pool) const {
  const int64_t h = config_.hidden_size;
  const uint16_t* table = buffers_[embed_group()].param;
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

void HostTrainingState::SplitEmbeddingRows(const std::vector<int32_t>& ids, int64_t vocab,
                                           int64_t hidden, std::vector<GroupSegment>* rows_out,
                                           std::vector<GroupSegment>* rest) {
  rows_out->clear();
  rest->clear();
  const std::vector<int64_t> rows = DistinctRows(ids);
  int64_t next_row = 0;
  for (size_t i = 0; i < rows.size();) {
    size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;
    const int64_t first = rows[i], count = static_cast<int64_t>(j - i);
    if (first > next_row) rest->push_back({next_row * hidden, (first - next_row) * hidden, true});
    rows_out->push_back({first * hidden, count * hidden, true});
    next_row = first + count;
    i = j;
  }
  if (next_row < vocab) rest->push_back({next_row * hidden, (vocab - next_row) * hidden, true});
}

double HostTrainingState::SumSquares(engine::ThreadPool& pool, const float* x,
                                     const std::vector<GroupSegment>& segments) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  struct Range {
    int64_t begin, end;
  };
  std::vector<Range> ranges;
  for (const GroupSegment& s : segments) {
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

}  // namespace lumen::cuda
