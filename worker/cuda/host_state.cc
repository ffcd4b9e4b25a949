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

}  // namespace

HostTrainingState::HostTrainingState(const engine::ModelConfig& config,
                                     std::vector<HostGroupBuffers> buffers,
                                     const MomentsHome& moments)
    : config_(config), shapes_(TensorGroupShapes(config)), buffers_(std::move(buffers)),
      moments_(moments) {}

HostTrainingState::~HostTrainingState() {
  if (moments_.home == nullptr || moments_.freed_by_owner) return;
  for (size_t g = 0; g < shapes_.size(); ++g) {
    for (int64_t c = 0; c < Chunks(g); ++c) {
      (void)moments_.home->Free(MomentId('m', g, c));
      (void)moments_.home->Free(MomentId('v', g, c));
    }
  }
}

int64_t HostTrainingState::OwnBytes(const engine::ModelConfig& config, bool moments_at_home,
                                    bool two_generations) {
  const std::vector<TensorGroupShape> shapes = TensorGroupShapes(config);
  int64_t elems = 0, largest = 0;
  for (const TensorGroupShape& s : shapes) {
    elems += s.elems;
    largest = std::max(largest, s.elems);
  }
  const int64_t chunk = std::min(largest, MomentsHome().chunk_elems);
  const int64_t own = 4 * elems + (moments_at_home ? 3 * 2 * 4 * chunk : 2 * 4 * elems);
  if (!two_generations) return own;
  const int64_t embed = shapes[config.num_hidden_layers].elems;
  return own + 3 * 4 * (elems - embed);
}

int64_t HostTrainingState::MomentsBytes(const engine::ModelConfig& config) {
  int64_t elems = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(config)) elems += s.elems;
  return 2 * 4 * elems;
}

absl::StatusOr<std::unique_ptr<HostTrainingState>> HostTrainingState::Create(
    const engine::ModelConfig& config, std::vector<HostGroupBuffers> buffers,
    const MomentsHome& moments, engine::ThreadPool& pool, bool two_generations) {
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
  if (two_generations && moments.home != nullptr) {
    return absl::InvalidArgumentError(
        "host state: two generations of the moments need them in this process, not a home");
  }
  if (moments.home != nullptr && moments.chunk_elems <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("host state: moments chunk of ", moments.chunk_elems, " values"));
  }
  std::unique_ptr<HostTrainingState> s(
      new HostTrainingState(config, std::move(buffers), moments));
  s->current_.assign(groups, 0);
  int64_t largest = 0;
  for (size_t g = 0; g < groups; ++g) {
    const int64_t e = s->shapes_[g].elems;
    largest = std::max(largest, e);
    // Uninitialised, then filled by the pool: a single-threaded fill of tens of GB takes tens
    // of seconds.
    const int gens = two_generations && g != s->embed_group() ? 2 : 1;
    for (int gen = 0; gen < 2; ++gen) {
      const bool held = gen < gens;
      s->master_[gen].emplace_back(held ? new float[e] : nullptr);
      if (held) Zero(pool, s->master_[gen].back().get(), e);
      if (moments.home == nullptr) {
        s->m_[gen].emplace_back(held ? new float[e] : nullptr);
        s->v_[gen].emplace_back(held ? new float[e] : nullptr);
      }
    }
    Zero(pool, s->buffers_[g].grad, e);
  }
  if (moments.home != nullptr) {
    s->slots_.reset(new float[3 * 2 * std::min(largest, moments.chunk_elems)]);
  }
  s->WriteBf16(pool);
  RETURN_IF_ERROR(s->ResetMoments(pool));
  return s;
}

std::string HostTrainingState::MomentId(char which, size_t g, int64_t chunk) const {
  return absl::StrCat(moments_.prefix, std::string(1, which), "/", g, "/", chunk);
}

int64_t HostTrainingState::Chunks(size_t g) const {
  return (shapes_[g].elems + moments_.chunk_elems - 1) / moments_.chunk_elems;
}

void HostTrainingState::RewriteBf16(size_t g, engine::ThreadPool& pool) {
  const float* master = Master(g, current_[g]);
  uint16_t* pb = buffers_[g].param;
  pool.ParallelFor(shapes_[g].elems, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) pb[i] = ToBf16Bits(master[i]);
  });
}

void HostTrainingState::WriteBf16(engine::ThreadPool& pool) {
  for (size_t g = 0; g < shapes_.size(); ++g) RewriteBf16(g, pool);
}

absl::Status HostTrainingState::ResetMoments(engine::ThreadPool& pool) {
  for (size_t g = 0; g < shapes_.size(); ++g) {
    const int64_t e = shapes_[g].elems;
    if (moments_.home == nullptr) {
      Zero(pool, M(g, current_[g]), e);
      Zero(pool, V(g, current_[g]), e);
      continue;
    }
    const int64_t chunk = std::min(e, moments_.chunk_elems);
    float* zeros = slots_.get();
    Zero(pool, zeros, chunk);
    for (int64_t c = 0; c < Chunks(g); ++c) {
      const int64_t n = std::min(chunk, e - c * chunk);
      RETURN_IF_ERROR(moments_.home->Put(MomentId('m', g, c), zeros, n, moments_.tier));
      RETURN_IF_ERROR(moments_.home->Put(MomentId('v', g, c), zeros, n, moments_.tier));
    }
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::SetParams(const engine::ModelParams& params,
                                          engine::ThreadPool& pool) {
  RETURN_IF_ERROR(CopyIn(0, params));
  WriteBf16(pool);
  return ResetMoments(pool);
}

absl::Status HostTrainingState::SetParams(engine::WeightsSource& weights,
                                          engine::ThreadPool& pool) {
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
    RewriteBf16(g, pool);
  }
  return ResetMoments(pool);
}

absl::Status HostTrainingState::InitRandom(uint64_t seed, engine::ThreadPool& pool) {
  for (size_t g = 0; g < shapes_.size(); ++g) {
    for (const GroupSegment& seg : shapes_[g].segments) {
      const uint64_t s = (seed * 1000003 + g) * 1000003 + seg.offset;
      float* p = Master(g, current_[g]) + seg.offset;
      pool.ParallelFor(seg.size, 1 << 16, [&](int64_t b, int64_t e) {
        if (seg.matrix) {
          HostFillNormal(p, b, e, s, static_cast<float>(config_.init_std));
        } else {
          std::fill(p + b, p + e, 1.0f);
        }
      });
    }
  }
  WriteBf16(pool);
  return ResetMoments(pool);
}

absl::Status HostTrainingState::CopyOutGroup(int which, size_t g,
                                             engine::ModelParams* out) const {
  if (g >= shapes_.size()) return absl::InvalidArgumentError(absl::StrCat("no tensor group ", g));
  if (out->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    out->layers.resize(config_.num_hidden_layers);
  }
  const int gen = current_[g];
  if (which == 0 || moments_.home == nullptr) {
    float* flat = which == 0 ? Master(g, gen) : which == 1 ? M(g, gen) : V(g, gen);
    return CopyGroupTensors(config_, out, g, flat, false);
  }
  // From a home a chunk at a time, through the first slot.
  const int64_t elems = shapes_[g].elems, chunk = moments_.chunk_elems;
  for (int64_t c = 0; c < Chunks(g); ++c) {
    const int64_t lo = c * chunk, hi = std::min(elems, lo + chunk);
    RETURN_IF_ERROR(moments_.home->Get(MomentId(which == 1 ? 'm' : 'v', g, c), slots_.get(),
                                       hi - lo));
    RETURN_IF_ERROR(CopyGroupRange(config_, out, g, lo, hi, slots_.get(), false));
  }
  return absl::OkStatus();
}

absl::Status HostTrainingState::CopyInGroup(int which, size_t g, const engine::ModelParams& in) {
  if (g >= shapes_.size()) return absl::InvalidArgumentError(absl::StrCat("no tensor group ", g));
  auto* p = const_cast<engine::ModelParams*>(&in);  // only read: to_flat
  if (which == 0 || moments_.home == nullptr) {
    const int gen = current_[g];
    float* flat = which == 0 ? Master(g, gen) : which == 1 ? M(g, gen) : V(g, gen);
    return CopyGroupTensors(config_, p, g, flat, true);
  }
  const int64_t elems = shapes_[g].elems, chunk = moments_.chunk_elems;
  for (int64_t c = 0; c < Chunks(g); ++c) {
    const int64_t lo = c * chunk, hi = std::min(elems, lo + chunk);
    std::fill(slots_.get(), slots_.get() + (hi - lo), 0.0f);  // the padding between tensors
    RETURN_IF_ERROR(CopyGroupRange(config_, p, g, lo, hi, slots_.get(), true));
    RETURN_IF_ERROR(moments_.home->Put(MomentId(which == 1 ? 'm' : 'v', g, c), slots_.get(),
                                       hi - lo, moments_.tier));
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

// AdamW on [b, e) of one tensor: the gradients scaled by `coef` in a small buffer (the
// gradients stay as they came, so a dropped update can be redone with another coefficient),
// the moments at m and v (indexed from b), then the bf16 copy.
void UpdateRange(float* master, const float* grad, float* m, float* v, uint16_t* bf16,
                 int64_t b, int64_t e, const engine::AdamWHyper& h, int64_t step, float coef) {
  float scaled[4096];
  for (int64_t c = b; c < e; c += 4096) {
    const int64_t k = std::min<int64_t>(4096, e - c);
    for (int64_t i = 0; i < k; ++i) scaled[i] = grad[c + i] * coef;
    engine::AdamWUpdate(master + c, scaled, m + (c - b), v + (c - b), k, h, step);
  }
  for (int64_t i = b; i < e; ++i) bf16[i] = ToBf16Bits(master[i]);
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
  if (moments_.home != nullptr) {
    if (from != current_[g] || to != current_[g]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "host state: group ", g, "'s moments are in a home, which holds one generation"));
    }
    return HomeAdamW(g, segs, hyper, step, coef, pool);
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
    UpdateRange(master, grad, m + o, v + o, pb, o, o + n, HyperFor(seg, hyper), step, coef);
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
                                          float coef, engine::ThreadPool& pool) {
  const int64_t elems = shapes_[g].elems, chunk = moments_.chunk_elems, chunks = Chunks(g);
  const int64_t slot_elems = std::min(chunk, std::max<int64_t>(1, elems));
  engine::TensorHome* home = moments_.home;
  auto slot_m = [&](int64_t c) { return slots_.get() + (c % 3) * 2 * slot_elems; };
  auto slot_v = [&](int64_t c) { return slot_m(c) + slot_elems; };
  auto size_of = [&](int64_t c) { return std::min(chunk, elems - c * chunk); };
  // Chunk c is read into slot c % 3 while chunk c - 1 is updated and chunk c - 2 written.
  std::future<absl::Status> reads[3], writes[3];
  auto read = [&](int64_t c) {
    reads[c % 3] = std::async(std::launch::async, [this, home, c, g, m = slot_m(c),
                                                    v = slot_v(c), n = size_of(c)] {
      RETURN_IF_ERROR(home->Get(MomentId('m', g, c), m, n));
      return home->Get(MomentId('v', g, c), v, n);
    });
  };
  absl::Status status;
  auto settle = [&status](std::future<absl::Status>& f) {
    if (!f.valid()) return;
    absl::Status s = f.get();
    if (status.ok() && !s.ok()) status = s;
  };
  float* master = Master(g, current_[g]);
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
    float *m = slot_m(c), *v = slot_v(c);
    for (const GroupSegment& seg : segs) {
      const int64_t b = std::max(lo, seg.offset), e = std::min(hi, seg.offset + seg.size);
      if (b >= e) continue;
      const engine::AdamWHyper h = HyperFor(seg, hyper);
      pool.ParallelFor(e - b, 1 << 16, [&](int64_t rb, int64_t re) {
        UpdateRange(master, grad, m + (b + rb - lo), v + (b + rb - lo), pb, b + rb, b + re, h,
                    step, coef);
      });
    }
    writes[c % 3] = std::async(std::launch::async, [this, home, c, g, m, v, n = hi - lo] {
      RETURN_IF_ERROR(home->Put(MomentId('m', g, c), m, n, moments_.tier));
      return home->Put(MomentId('v', g, c), v, n, moments_.tier);
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
