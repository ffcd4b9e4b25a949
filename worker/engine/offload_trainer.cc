#include "worker/engine/offload_trainer.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/kernels.h"
#include "worker/engine/optimizer.h"

namespace lumen::engine {

std::string FormatBytes(int64_t bytes) {
  return absl::StrFormat("%.2f MiB (%d bytes)", static_cast<double>(bytes) / (1 << 20), bytes);
}

// ---- DeviceMemory ----

DeviceMemory::Allocation &DeviceMemory::Allocation::operator=(Allocation &&other) noexcept {
  if (this != &other) {
    Release();
    owner_ = other.owner_;
    bytes_ = other.bytes_;
    other.owner_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void DeviceMemory::Allocation::Release() {
  if (owner_ != nullptr) owner_->Free(bytes_);
  owner_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<DeviceMemory::Allocation> DeviceMemory::Allocate(int64_t bytes,
                                                                const std::string &op) {
  absl::MutexLock lock(&mu_);
  if (bytes < 0 || in_use_ + bytes > budget_) {
    return absl::ResourceExhaustedError(absl::StrCat(op, " needs ", FormatBytes(bytes),
                                                     " more; device budget ", FormatBytes(budget_),
                                                     ", in use ", FormatBytes(in_use_)));
  }
  in_use_ += bytes;
  peak_ = std::max(peak_, in_use_);
  Allocation a;
  a.owner_ = this;
  a.bytes_ = bytes;
  return a;
}

void DeviceMemory::Free(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  in_use_ -= bytes;
}

int64_t DeviceMemory::in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

int64_t DeviceMemory::peak() const {
  absl::MutexLock lock(&mu_);
  return peak_;
}

void DeviceMemory::ResetPeak() {
  absl::MutexLock lock(&mu_);
  peak_ = in_use_;
}

// ---- OffloadTrainer ----

namespace {

constexpr int64_t kF = sizeof(float);
// Tensors per decoder layer in NamedTensors order.
constexpr int kLayerTensors = 9;

const char *FiniteName(double x) {
  if (std::isnan(x)) return "nan";
  return x > 0 ? "inf" : "-inf";
}

std::string ParamId(const std::string &name) { return "param/" + name; }
std::string GradId(const std::string &name) { return "grad/" + name; }
std::string ExpAvgId(const std::string &name) { return "exp_avg/" + name; }
std::string ExpAvgSqId(const std::string &name) { return "exp_avg_sq/" + name; }

// sum of g[j]^2 in double, in the order every gradient norm here is taken.
double SquareSum(const float *g, int64_t n) {
  return kernels::LaneSum(n, [g](int64_t j) { return static_cast<double>(g[j]) * g[j]; });
}
// Input of layer l (l = num_layers: the last layer's output) of micro-batch a.
std::string ActId(int64_t l, int64_t a) { return absl::StrCat("act/x", l, "/mb", a); }
// Gradient w.r.t. the residual stream of micro-batch a, at the layer being run
// backward.
std::string DyId(int64_t a) { return absl::StrCat("act/dy/mb", a); }

int64_t Numel(const NamedTensor<float> &t) {
  int64_t n = 1;
  for (int64_t s : t.shape) n *= s;
  return n;
}

// Adds the wall time of its scope to *seconds and, when `events` is not null, records it as
// an event (seconds from `origin`).
class Timer {
 public:
  explicit Timer(double *seconds) : seconds_(seconds), start_(std::chrono::steady_clock::now()) {}
  Timer(double *seconds, std::vector<TraceEvent> *events, const char *category,
        std::string name, std::chrono::steady_clock::time_point origin)
      : seconds_(seconds),
        start_(std::chrono::steady_clock::now()),
        events_(events),
        category_(category),
        name_(std::move(name)),
        origin_(origin) {}
  ~Timer() {
    const auto end = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(end - start_).count();
    *seconds_ += seconds;
    if (events_ != nullptr) {
      events_->push_back({std::move(name_), category_,
                          std::chrono::duration<double>(start_ - origin_).count(), seconds});
    }
  }

 private:
  double *seconds_;
  std::chrono::steady_clock::time_point start_;
  std::vector<TraceEvent> *events_ = nullptr;
  const char *category_ = "";
  std::string name_;
  std::chrono::steady_clock::time_point origin_;
};

// Reads further ahead than this many trace entries are not matched to a fetch.
constexpr size_t kCursorSearch = 256;

}  // namespace

// Device buffers swapped into the model's parameter/gradient vectors for the
// duration of an op. Whatever is still bound at destruction (an error path) is
// dropped from the model.
class OffloadTrainer::Binding {
 public:
  explicit Binding(OffloadTrainer *t) : t_(t) {}
  ~Binding() {
    for (auto &[key, buf] : bound_) std::vector<float>().swap(*Slot(key.first, key.second));
  }
  void Bind(int index, bool grad, DeviceBuffer buf) {
    std::swap(*Slot(index, grad), buf.data);
    bound_[{index, grad}] = std::move(buf);
  }
  DeviceBuffer Unbind(int index, bool grad) {
    auto it = bound_.find({index, grad});
    DeviceBuffer buf = std::move(it->second);
    bound_.erase(it);
    std::swap(*Slot(index, grad), buf.data);
    return buf;
  }

 private:
  std::vector<float> *Slot(int index, bool grad) {
    return grad ? t_->grad_slots_[index].data : t_->param_slots_[index].data;
  }
  OffloadTrainer *t_;
  std::map<std::pair<int, bool>, DeviceBuffer> bound_;
};

OffloadTrainer::OffloadTrainer(const TrainerOptions &options, const OffloadOptions &offload)
    : options_(options), offload_(offload), mem_(offload.device_budget_bytes) {}

OffloadTrainer::~OffloadTrainer() {
  // Device buffers release their accounting into mem_; drop them first.
  DropPrefetches();
  transfers_.reset();
  device_.clear();
}

absl::StatusOr<std::unique_ptr<OffloadTrainer>> OffloadTrainer::Create(
    const TrainerOptions &options, const OffloadOptions &offload) {
  RETURN_IF_ERROR(ValidateTrainerOptions(options));
  if (offload.device_budget_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("offload.device_budget_bytes ", offload.device_budget_bytes, " must be > 0"));
  }
  std::unique_ptr<OffloadTrainer> tr(new OffloadTrainer(options, offload));
  RETURN_IF_ERROR(tr->Init());
  return tr;
}

absl::Status OffloadTrainer::Init() {
  const TrainConfig &t = options_.train;
  const ModelConfig &c = options_.model;
  openblas_set_num_threads(1);
  pool_ = std::make_unique<ThreadPool>(std::max(1, options_.num_threads));
  ASSIGN_OR_RETURN(data_, TokenDataset::Open(options_.data, t.seq_len, c.vocab_size));
  model_ = LlamaModel::CreateUnallocated(c, pool_.get());
  param_slots_ = NamedTensors(c, &model_->params());
  grad_slots_ = NamedTensors(c, &model_->grads());
  const int64_t n = t.grad_accum_steps * t.micro_batch_size * t.seq_len;
  inputs_.resize(n);
  targets_.resize(n);

  // Placement: everything resident when the whole state, every activation a
  // step stores and the largest op fit; else stream, with checkpoint slots in
  // what the largest op leaves.
  const int64_t act_bytes = kF * t.micro_batch_size * t.seq_len * c.hidden_size;
  const int64_t max_acts = (c.num_hidden_layers + 2) * t.grad_accum_steps;
  const int64_t ws = MinDeviceBytes();
  const int64_t budget = offload_.device_budget_bytes;
  resident_ = 4 * kF * ParameterCount(c) + ws + max_acts * act_bytes <= budget;
  // Off the device, memory beyond the largest op holds the next op's
  // parameters and a few activations being prefetched, about as much again
  // being written home behind compute, and then activation checkpoints.
  int64_t group = kF * (c.vocab_size * c.hidden_size + c.hidden_size);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    int64_t layer = 0;
    for (int i = 0; i < kLayerTensors; ++i) layer += Numel(param_slots_[1 + kLayerTensors * l + i]);
    group = std::max(group, kF * layer);
  }
  const int64_t spare = std::max<int64_t>(0, budget - ws);
  prefetch_window_ = offload_.prefetch ? std::min(spare / 2, group + 4 * act_bytes) : 0;
  const int64_t behind = std::min(spare - prefetch_window_, group);
  max_resident_acts_ =
      resident_ ? max_acts
                : std::clamp<int64_t>((spare - prefetch_window_ - behind) / act_bytes, 0, max_acts);
  if (!resident_ && offload_.home == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offload.home is null but the training state (", FormatBytes(TrainingStateBytes()),
        ") does not fit the device budget ", FormatBytes(offload_.device_budget_bytes)));
  }
  Collective *const replicas = offload_.replica.collective;
  shared_state_ = !resident_ && replicas != nullptr;
  if (!resident_) {
    TensorHome *host = offload_.host_home != nullptr ? offload_.host_home : offload_.home;
    TensorHome *home = offload_.home;
    if (shared_state_) {
      // The parameters and moments are every replica's; gradients and checkpoints its own.
      const std::vector<std::string> own = {"grad/", "act/"};
      replica_home_ =
          std::make_unique<RenamedTensorHome>(home, ReplicaPrefix(replicas->rank()), own);
      replica_host_home_ =
          std::make_unique<RenamedTensorHome>(host, ReplicaPrefix(replicas->rank()), own);
      home = replica_home_.get();
      host = replica_host_home_.get();
      // Each replica owns a contiguous run of tensors, about an equal share of the elements.
      int64_t total = 0, before = 0;
      for (const NamedTensor<float> &p : param_slots_) total += Numel(p);
      for (const NamedTensor<float> &p : param_slots_) {
        owner_.push_back(static_cast<int>(
            std::min<int64_t>(replicas->size() - 1, before * replicas->size() / total)));
        before += Numel(p);
      }
    }
    home_ = std::make_unique<AliasedTensorHome>(home, &aliases_);
    // Host jobs name the stored generations themselves (HostAdamW).
    transfers_ = std::make_unique<Transfers>(home_.get(), host);
  }
  generation_.assign(param_slots_.size(), 0);

  // Initialise exactly as Trainer, a tensor at a time as each is placed where it lives: from a
  // file, or the seeded random stream. Neither is ever whole in memory.
  ModelParams init;
  init.layers.resize(c.num_hidden_layers);
  std::unique_ptr<WeightsSource> weights;
  if (!options_.init_from.empty()) {
    ASSIGN_OR_RETURN(weights, WeightsReader::Open(options_.init_from, c));
  } else {
    weights = std::make_unique<RandomWeights>(c, t.seed, pool_.get());
  }
  // AdamW's moments: zero, or a checkpoint's (with its step counter), read one parameter's at
  // a time as they are placed.
  std::unique_ptr<OptimizerStateReader> moments;
  if (!options_.optimizer_state_from.empty()) {
    ASSIGN_OR_RETURN(moments, OptimizerStateReader::Open(options_.optimizer_state_from, c));
    step_ = moments->step();
  }
  for (NamedTensor<float> &p : NamedTensors(c, &init)) {
    const int64_t size = Numel(p);
    p.data->resize(size);
    RETURN_IF_ERROR(weights->Read(p.name, p.data->data()));
    std::vector<float> m(size, 0.0f), v(moments != nullptr ? size : 0, 0.0f);
    if (moments != nullptr) RETURN_IF_ERROR(moments->Read(p.name, m.data(), v.data()));
    const float *vp = moments != nullptr ? v.data() : m.data();  // zeros for both
    for (auto [id, src, tier] :
         {std::tuple<std::string, const float *, HomeTier>{ParamId(p.name), p.data->data(),
                                                           offload_.parameters_tier},
          {ExpAvgId(p.name), m.data(), offload_.optimizer_state_tier},
          {ExpAvgSqId(p.name), vp, offload_.optimizer_state_tier}}) {
      if (resident_) {
        ASSIGN_OR_RETURN(DeviceBuffer buf,
                         NewBuffer(size, true, absl::StrCat("initial placement of ", id)));
        std::copy(src, src + size, buf.data.begin());
        device_[id] = std::move(buf);
      } else {
        // Replica 0 places the state the replicas share.
        if (!shared_state_ || replicas->rank() == 0) {
          RETURN_IF_ERROR(home_->Put(id, src, size, tier));
        }
        at_home_.insert(id);
      }
    }
    std::vector<float>().swap(*p.data);
  }
  // No replica reads the shared state before it is placed.
  if (shared_state_) {
    std::vector<double> none;
    RETURN_IF_ERROR(ReplicaBarrier(0, &none));
  }
  return absl::OkStatus();
}

std::string OffloadTrainer::ReplicaPrefix(int rank) { return absl::StrCat("r", rank, "/"); }

absl::Status OffloadTrainer::ReplicaBarrier(int phase, std::vector<double> *scalars) {
  return offload_.replica.collective->SumAcrossReplicas(4 * step_ + phase, {}, scalars);
}

absl::StatusOr<OffloadRequirements> OffloadTrainer::Requirements(const TrainerOptions &options) {
  RETURN_IF_ERROR(ValidateTrainerOptions(options));
  const ModelConfig &c = options.model;
  const TrainConfig &t = options.train;
  ThreadPool pool(1);
  std::unique_ptr<LlamaModel> model = LlamaModel::CreateUnallocated(c, &pool);
  const std::vector<NamedTensor<float>> slots = NamedTensors(c, &model->params());
  OffloadRequirements r;
  r.largest_op_bytes = -1;
  for (const OpSize &o : WorkingSets(options, *model, slots)) {
    if (o.bytes > r.largest_op_bytes) {
      r.largest_op_bytes = o.bytes;
      r.largest_op = o.op;
    }
  }
  r.parameter_bytes = kF * ParameterCount(c);
  r.activation_bytes = kF * (c.num_hidden_layers + 1) * t.grad_accum_steps * t.micro_batch_size *
                       t.seq_len * c.hidden_size;
  return r;
}

int64_t OffloadTrainer::TrainingStateBytes() const {
  const ModelConfig &c = options_.model;
  const TrainConfig &t = options_.train;
  return 4 * kF * ParameterCount(c) + kF * (c.num_hidden_layers + 1) * t.grad_accum_steps *
                                          t.micro_batch_size * t.seq_len * c.hidden_size;
}

std::vector<OffloadTrainer::OpSize> OffloadTrainer::OpWorkingSets() const {
  return WorkingSets(options_, *model_, param_slots_);
}

std::vector<OffloadTrainer::OpSize> OffloadTrainer::WorkingSets(
    const TrainerOptions &options, const LlamaModel &model,
    const std::vector<NamedTensor<float>> &param_slots) {
  const ModelConfig &c = options.model;
  const TrainConfig &t = options.train;
  const int64_t h = c.hidden_size, L = c.num_hidden_layers;
  const int64_t n = t.micro_batch_size * t.seq_len;
  const int64_t act = kF * n * h;
  const int64_t ids = 2 * static_cast<int64_t>(sizeof(int32_t)) * t.grad_accum_steps * n;
  const int64_t embed = kF * c.vocab_size * h;
  const int64_t head_params = embed + kF * h;  // LM head (or tied embedding) + final norm
  const int64_t layer_params =
      kF * (ParameterCount(c) - c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) - h) / L;
  const int64_t layer_scratch = model.LayerScratchBytes(t.micro_batch_size, t.seq_len);
  const int64_t head_scratch = model.HeadScratchBytes(t.micro_batch_size, t.seq_len);
  int64_t largest = 0;
  for (const NamedTensor<float> &s : param_slots) largest = std::max(largest, Numel(s));
  std::vector<OpSize> ops;
  ops.push_back({"embedding forward", ids + embed + act});
  for (int64_t l = 0; l < L; ++l) {
    ops.push_back(
        {absl::StrCat("forward of layer ", l), ids + layer_params + layer_scratch + 2 * act});
  }
  ops.push_back({"head", ids + 2 * head_params + head_scratch + 2 * act});
  for (int64_t l = L - 1; l >= 0; --l) {
    ops.push_back(
        {absl::StrCat("backward of layer ", l), ids + 2 * layer_params + layer_scratch + 3 * act});
  }
  ops.push_back({"embedding backward", ids + embed + act});
  ops.push_back({"gradient norm", kF * largest});
  ops.push_back({"optimizer", 4 * kF * largest});
  return ops;
}

int64_t OffloadTrainer::MinDeviceBytes() const {
  int64_t m = 0;
  for (const OpSize &o : OpWorkingSets()) m = std::max(m, o.bytes);
  return m;
}

std::string OffloadTrainer::LargestOp() const {
  OpSize best{"", -1};
  for (const OpSize &o : OpWorkingSets()) {
    if (o.bytes > best.bytes) best = o;
  }
  return best.op;
}

absl::StatusOr<DeviceMemory::Allocation> OffloadTrainer::Allocate(int64_t bytes,
                                                                  const std::string &op) {
  while (true) {
    const int64_t writes_before = transfers_ != nullptr ? transfers_->writes_completed() : 0;
    absl::StatusOr<DeviceMemory::Allocation> a = mem_.Allocate(bytes, op);
    if (a.ok() || transfers_ == nullptr) return a;
    Timer wait(&stats_.stall_memory_seconds, Tracing(), "wait", "wait for memory: " + op,
               step_start_);
    if (transfers_->WaitForWrite(writes_before)) continue;
    // Prefetched reads are the only other holders; give their memory back
    // (the tensors are read again when needed).
    if (prefetched_.empty()) return a;
    DropPrefetches();
  }
}

absl::StatusOr<OffloadTrainer::DeviceBuffer> OffloadTrainer::NewBuffer(int64_t n, bool resident,
                                                                       const std::string &op) {
  DeviceBuffer buf;
  ASSIGN_OR_RETURN(buf.alloc, Allocate(kF * n, op));
  buf.data.assign(n, 0.0f);
  buf.resident = resident;
  return buf;
}

int64_t OffloadTrainer::StepVersion(const std::string &id) const {
  auto it = step_writes_.find(id);
  return it == step_writes_.end() ? 0 : it->second;
}

void OffloadTrainer::IssuePrefetches() {
  if (!traced_ || prefetch_window_ <= 0 || transfers_ == nullptr) return;
  size_t j = std::max(issue_cursor_, cursor_);
  for (; j < trace_.size(); ++j) {
    const TraceEntry &e = trace_[j];
    // Not written yet in this step as far as the traced read needs, or a
    // read of it already in flight: wait.
    if (StepVersion(e.id) != e.version || prefetched_.count(e.id) > 0) break;
    if (device_.count(e.id) > 0) continue;
    if (at_home_.count(e.id) == 0) break;
    const int64_t bytes = kF * e.n;
    if (prefetched_bytes_ + bytes > prefetch_window_) break;
    absl::StatusOr<DeviceMemory::Allocation> alloc = mem_.Allocate(bytes, "prefetch of " + e.id);
    if (!alloc.ok()) break;
    Prefetch p;
    p.buf.alloc = *std::move(alloc);
    p.buf.data.resize(e.n);
    p.ticket = transfers_->Read(e.id, p.buf.data.data(), e.n);
    prefetched_bytes_ += bytes;
    prefetched_.emplace(e.id, std::move(p));
  }
  issue_cursor_ = j;
}

void OffloadTrainer::IssueScheduled(int op) {
  const std::vector<std::vector<int>> &at = offload_.schedule.at_op;
  if (traced_ || !offload_.prefetch || transfers_ == nullptr ||
      op >= static_cast<int>(at.size())) {
    return;
  }
  const int L = static_cast<int>(options_.model.num_hidden_layers);
  const int norm_index = 1 + kLayerTensors * L;
  for (int layer : at[op]) {
    std::vector<int> tensors;
    if (layer == 0) {
      tensors = {0};
    } else if (layer <= L) {
      for (int i = 0; i < kLayerTensors; ++i) tensors.push_back(1 + kLayerTensors * (layer - 1) + i);
    } else {
      tensors = {norm_index, options_.model.tie_word_embeddings ? 0 : norm_index + 1};
    }
    for (int i : tensors) {
      const std::string id = ParamId(param_slots_[i].name);
      if (device_.count(id) > 0 || prefetched_.count(id) > 0 || at_home_.count(id) == 0) continue;
      const int64_t n = Numel(param_slots_[i]);
      // What the budget cannot hold now is read when needed.
      absl::StatusOr<DeviceMemory::Allocation> alloc =
          mem_.Allocate(kF * n, "scheduled prefetch of " + id);
      if (!alloc.ok()) return;
      Prefetch p;
      p.buf.alloc = *std::move(alloc);
      p.buf.data.resize(n);
      p.ticket = transfers_->Read(id, p.buf.data.data(), n);
      prefetched_bytes_ += kF * n;
      prefetched_.emplace(id, std::move(p));
    }
  }
}

void OffloadTrainer::DropPrefetch(const std::string &id) {
  auto it = prefetched_.find(id);
  if (it == prefetched_.end()) return;
  it->second.ticket->Wait().IgnoreError();  // its buffer must not be freed mid-read
  prefetched_bytes_ -= it->second.buf.alloc.bytes();
  prefetched_.erase(it);
}

void OffloadTrainer::DropPrefetches() {
  for (auto &[id, p] : prefetched_) p.ticket->Wait().IgnoreError();
  prefetched_.clear();
  prefetched_bytes_ = 0;
  issue_cursor_ = cursor_;
}

absl::StatusOr<OffloadTrainer::DeviceBuffer> OffloadTrainer::Fetch(const std::string &id, int64_t n,
                                                                   const std::string &op) {
  if (recording_) {
    trace_.push_back({id, n, StepVersion(id)});
  } else if (traced_) {
    for (size_t j = cursor_; j < std::min(trace_.size(), cursor_ + kCursorSearch); ++j) {
      if (trace_[j].id == id) {
        cursor_ = j + 1;
        break;
      }
    }
  }
  auto it = device_.find(id);
  if (it != device_.end()) {
    DeviceBuffer buf = std::move(it->second);
    device_.erase(it);
    IssuePrefetches();
    return buf;
  }
  ++stats_.home_reads;
  DeviceBuffer buf;
  auto pit = prefetched_.find(id);
  std::shared_ptr<const Transfers::Ticket> ticket;
  if (pit != prefetched_.end() && static_cast<int64_t>(pit->second.buf.data.size()) == n) {
    buf = std::move(pit->second.buf);
    ticket = std::move(pit->second.ticket);
    prefetched_.erase(pit);
    prefetched_bytes_ -= kF * n;
    ++stats_.prefetched_reads;
    if (ticket->done()) ++stats_.prefetch_hits;
  } else {
    DropPrefetch(id);
    ASSIGN_OR_RETURN(buf, NewBuffer(n, false, absl::StrCat(op, ": ", id)));
    ticket = transfers_->Read(id, buf.data.data(), n);
  }
  // Start the next reads before standing still for this one.
  IssuePrefetches();
  if (ticket->done()) {
    RETURN_IF_ERROR(ticket->Wait());
  } else {
    const bool optimizer = transfers_->HostJobWrites(id);
    Timer wait(optimizer ? &stats_.stall_optimizer_seconds : &stats_.stall_transfer_seconds,
               Tracing(), "wait",
               absl::StrCat(optimizer ? "wait for optimizer: " : "wait for read: ", id),
               step_start_);
    RETURN_IF_ERROR(ticket->Wait());
  }
  bytes_in_ += kF * n;
  return buf;
}

absl::StatusOr<OffloadTrainer::DeviceBuffer> OffloadTrainer::FetchZeroed(const std::string &id,
                                                                         int64_t n, bool resident,
                                                                         const std::string &op) {
  auto it = device_.find(id);
  if (it != device_.end()) {
    DeviceBuffer buf = std::move(it->second);
    device_.erase(it);
    std::fill(buf.data.begin(), buf.data.end(), 0.0f);
    return buf;
  }
  DropPrefetch(id);
  return NewBuffer(n, resident, absl::StrCat(op, ": ", id));
}

void OffloadTrainer::WriteHome(const std::string &id, DeviceBuffer buf, HomeTier tier) {
  DropPrefetch(id);
  ++step_writes_[id];
  at_home_.insert(id);
  const int64_t n = static_cast<int64_t>(buf.data.size());
  bytes_out_ += kF * n;
  auto holder = std::make_shared<DeviceBuffer>(std::move(buf));
  const float *data = holder->data.data();
  transfers_->Write(id, data, n, tier, std::move(holder));
}

void OffloadTrainer::FreeHome(const std::string &id) {
  DropPrefetch(id);
  at_home_.erase(id);
  transfers_->Free(id);
}

absl::Status OffloadTrainer::Return(const std::string &id, DeviceBuffer buf, HomeTier tier,
                                    bool dirty) {
  if (buf.resident) {
    device_[id] = std::move(buf);
    return absl::OkStatus();
  }
  if (dirty) WriteHome(id, std::move(buf), tier);
  return transfers_->status();
}

int64_t OffloadTrainer::ResidentActivations() const {
  int64_t count = 0;
  for (auto it = device_.lower_bound("act/");
       it != device_.end() && it->first.rfind("act/", 0) == 0; ++it) {
    ++count;
  }
  return count;
}

bool OffloadTrainer::EvictActivation() {
  // Farthest next use first: the lowest layer's checkpoint (backward runs from
  // the top), and within it the last micro-batch.
  std::string victim;
  std::pair<int64_t, int64_t> best{0, 0};
  for (auto it = device_.lower_bound("act/x");
       it != device_.end() && it->first.rfind("act/x", 0) == 0; ++it) {
    long l = 0, a = 0;
    if (std::sscanf(it->first.c_str(), "act/x%ld/mb%ld", &l, &a) != 2) continue;
    const std::pair<int64_t, int64_t> key{l, a};
    if (!(key < evict_before_)) continue;
    if (victim.empty() || l < best.first || (l == best.first && a > best.second)) {
      victim = it->first;
      best = key;
    }
  }
  if (victim.empty()) return false;
  auto it = device_.find(victim);
  DeviceBuffer buf = std::move(it->second);
  device_.erase(it);
  buf.resident = false;
  WriteHome(victim, std::move(buf), offload_.activations_tier);
  return true;
}

absl::Status OffloadTrainer::StoreActivation(const std::string &id, DeviceBuffer buf) {
  while (ResidentActivations() >= max_resident_acts_ && EvictActivation()) {
  }
  buf.resident = ResidentActivations() < max_resident_acts_;
  return Return(id, std::move(buf), offload_.activations_tier, true);
}

absl::Status OffloadTrainer::DropActivation(const std::string &id, DeviceBuffer buf) {
  if (!buf.resident) FreeHome(id);
  return absl::OkStatus();
}

void OffloadTrainer::DropResidentActivations() {
  for (auto it = device_.lower_bound("act/");
       it != device_.end() && it->first.rfind("act/", 0) == 0;) {
    it = device_.erase(it);
  }
}

absl::Status OffloadTrainer::Flush() {
  return transfers_ != nullptr ? transfers_->Drain() : absl::OkStatus();
}

absl::StatusOr<OffloadStepResult> OffloadTrainer::Step() {
  if (transfers_ != nullptr) RETURN_IF_ERROR(transfers_->status());
  bytes_in_ = bytes_out_ = 0;
  stats_ = OffloadStepResult();
  grad_sq_.assign(param_slots_.size(), 0.0);
  mem_.ResetPeak();
  recording_ = offload_.prefetch && !traced_ && !resident_;
  if (recording_) trace_.clear();
  // The trainer's first step is traced: every compute op and every wait, in order.
  tracing_ = !first_step_traced_;
  if (tracing_) trace_events_.clear();
  absl::StatusOr<OffloadStepResult> r = RunStep();
  recording_ = false;
  if (tracing_ && r.ok()) first_step_traced_ = true;
  tracing_ = false;
  if (!r.ok()) {
    // A failed step leaves activations behind; they are scratch. So are
    // updates it overlapped with its backward.
    FinishOverlap(false);
    DropPrefetches();
    DropResidentActivations();
    if (!traced_) trace_.clear();
  } else {
    ++step_;
    traced_ = traced_ || (offload_.prefetch && !resident_);
  }
  // The next step starts from the top of the trace; its first reads start now,
  // behind this step's optimizer updates.
  DropPrefetches();
  step_writes_.clear();
  cursor_ = issue_cursor_ = 0;
  if (r.ok()) IssuePrefetches();
  return r;
}

absl::StatusOr<OffloadStepResult> OffloadTrainer::RunStep() {
  const auto start = std::chrono::steady_clock::now();
  step_start_ = start;
  const TrainConfig &t = options_.train;
  const ModelConfig &c = options_.model;
  const int64_t A = t.grad_accum_steps, B = t.micro_batch_size, T = t.seq_len;
  const int64_t n = B * T, h = c.hidden_size, L = c.num_hidden_layers;
  const int64_t act = n * h;
  const bool tied = c.tie_word_embeddings;
  const HomeTier ptier = offload_.parameters_tier, gtier = offload_.gradients_tier;
  // A replica's micro-batches are a share of the step's (OffloadOptions::replica).
  const int64_t global_a =
      offload_.replica.global_micro_batches > 0 ? offload_.replica.global_micro_batches : A;
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(global_a));
  const int num_tensors = static_cast<int>(param_slots_.size());
  const int norm_index = 1 + kLayerTensors * static_cast<int>(L);
  const int head_index = tied ? 0 : norm_index + 1;
  auto size_of = [&](int i) { return Numel(param_slots_[i]); };
  auto name_of = [&](int i) -> const std::string & { return param_slots_[i].name; };

  // AdamW overlaps the backward unless the last step needed clipping (then
  // this one probably does too, and would redo it).
  overlap_ = !resident_ && !shared_state_ && offload_.host_optimizer &&
             offload_.overlap_optimizer && !last_step_clipped_;
  overlap_lr_ = LearningRate(options_.optimizer, step_, t.steps);
  overlapped_.clear();

  // Refuse up front when one op cannot fit, so that no step ever runs half-way
  // into it.
  for (const OpSize &o : OpWorkingSets()) {
    if (o.bytes > mem_.budget() - (resident_ ? mem_.in_use() : 0)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("step ", step_, ": ", o.op, " needs ", FormatBytes(o.bytes),
                       " of device memory; device budget ", FormatBytes(mem_.budget()),
                       ". Raise the device budget or lower train.micro_batch_size / "
                       "seq_len"));
    }
  }

  // Token ids of every micro-batch stay on the device for the step.
  ASSIGN_OR_RETURN(DeviceMemory::Allocation ids_alloc,
                   Allocate(2 * static_cast<int64_t>(sizeof(int32_t)) * A * n,
                                 absl::StrCat("step ", step_, ": token ids")));
  for (int64_t a = 0; a < A; ++a) {
    RETURN_IF_ERROR(data_->ReadBatch(step_, offload_.replica.micro_batch_offset + a, global_a,
                                     B, inputs_.data() + a * n, targets_.data() + a * n));
  }

  // Embedding forward for every micro-batch.
  {
    const std::string op = "embedding forward";
    Binding bind(this);
    IssueScheduled(0);
    ASSIGN_OR_RETURN(DeviceBuffer e, Fetch(ParamId(name_of(0)), size_of(0), op));
    bind.Bind(0, false, std::move(e));
    evict_before_ = {0, 0};
    for (int64_t a = 0; a < A; ++a) {
      ASSIGN_OR_RETURN(DeviceBuffer x, NewBuffer(act, false, op + ": output"));
      {
        Timer busy(&stats_.compute_seconds, Tracing(), "compute", absl::StrCat(op, ", mb ", a),
                   step_start_);
        RETURN_IF_ERROR(model_->EmbedForward(inputs_.data() + a * n, B, T, x.data.data()));
      }
      RETURN_IF_ERROR(StoreActivation(ActId(0, a), std::move(x)));
    }
    RETURN_IF_ERROR(Return(ParamId(name_of(0)), bind.Unbind(0, false), ptier, false));
  }

  // Decoder layers forward, layer-wise batched: each layer runs every
  // micro-batch.
  {
    DeviceMemory::Allocation scratch;
    for (int64_t l = 0; l < L; ++l) {
      const std::string op = absl::StrCat("forward of layer ", l);
      const int first = 1 + kLayerTensors * static_cast<int>(l);
      Binding bind(this);
      IssueScheduled(static_cast<int>(1 + l));
      for (int i = first; i < first + kLayerTensors; ++i) {
        ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
        bind.Bind(i, false, std::move(p));
      }
      if (scratch.bytes() == 0) {
        ASSIGN_OR_RETURN(
            scratch, Allocate(model_->LayerScratchBytes(B, T), op + ": activation scratch"));
      }
      for (int64_t a = 0; a < A; ++a) {
        // Checkpoints this forward has consumed may go home to make room.
        evict_before_ = {l, a + 1};
        ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(l, a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer y, NewBuffer(act, false, op + ": output"));
        {
          Timer busy(&stats_.compute_seconds, Tracing(), "compute", absl::StrCat(op, ", mb ", a),
                     step_start_);
          RETURN_IF_ERROR(model_->DecoderLayerForward(static_cast<int>(l), x.data.data(),
                                                      y.data.data(), B, T));
        }
        // The input stays stored for the backward (its home copy, if any, is
        // current).
        RETURN_IF_ERROR(Return(ActId(l, a), std::move(x), offload_.activations_tier, false));
        RETURN_IF_ERROR(StoreActivation(ActId(l + 1, a), std::move(y)));
      }
      for (int i = first; i < first + kLayerTensors; ++i) {
        RETURN_IF_ERROR(Return(ParamId(name_of(i)), bind.Unbind(i, false), ptier, false));
      }
    }
    model_->ReleaseLayerScratch();
  }

  // Head: final norm, LM head, loss and their backward, for every micro-batch.
  double loss_sum = 0;
  {
    const std::string op = "head";
    Binding bind(this);
    IssueScheduled(static_cast<int>(L + 1));
    for (int i : {norm_index, head_index}) {
      ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
      bind.Bind(i, false, std::move(p));
      ASSIGN_OR_RETURN(DeviceBuffer g, FetchZeroed(GradId(name_of(i)), size_of(i), resident_, op));
      bind.Bind(i, true, std::move(g));
    }
    ASSIGN_OR_RETURN(DeviceMemory::Allocation scratch,
                     Allocate(model_->HeadScratchBytes(B, T), op + ": scratch and logits"));
    evict_before_ = {L, 0};
    for (int64_t a = 0; a < A; ++a) {
      ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(L, a), act, op));
      ASSIGN_OR_RETURN(DeviceBuffer dy, NewBuffer(act, false, op + ": input gradient"));
      double loss;
      {
        Timer busy(&stats_.compute_seconds, Tracing(), "compute", absl::StrCat(op, ", mb ", a),
                   step_start_);
        ASSIGN_OR_RETURN(loss, model_->HeadForwardBackward(x.data.data(), targets_.data() + a * n,
                                                           B, T, grad_scale, dy.data.data()));
      }
      if (!std::isfinite(loss)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "step ", step_, ": loss is ", FiniteName(loss), " (micro-batch ", a + 1, " of ", A,
            "); training diverged or the weights hold non-finite "
            "values. Parameters and "
            "optimizer state are unchanged; lower optimizer.lr or "
            "check init_from"));
      }
      loss_sum += loss;
      RETURN_IF_ERROR(DropActivation(ActId(L, a), std::move(x)));
      RETURN_IF_ERROR(StoreActivation(DyId(a), std::move(dy)));
    }
    model_->ReleaseHeadScratch();
    scratch.Release();
    for (int i : {norm_index, head_index}) {
      RETURN_IF_ERROR(Return(ParamId(name_of(i)), bind.Unbind(i, false), ptier, false));
      DeviceBuffer g = bind.Unbind(i, true);
      // A tied embedding's gradient is complete only after the embedding backward.
      if (i != 0) GradDone(i, g);
      RETURN_IF_ERROR(Return(GradId(name_of(i)), std::move(g), gtier, true));
      if (i != 0) OverlapUpdate(i);
    }
  }

  // Decoder layers backward in reverse, recomputing each from its checkpoint; a
  // layer's gradient is complete once every micro-batch has passed, and goes
  // home at once.
  {
    DeviceMemory::Allocation scratch;
    for (int64_t l = L - 1; l >= 0; --l) {
      const std::string op = absl::StrCat("backward of layer ", l);
      const int first = 1 + kLayerTensors * static_cast<int>(l);
      Binding bind(this);
      IssueScheduled(static_cast<int>(L + 2 + (L - 1 - l)));
      for (int i = first; i < first + kLayerTensors; ++i) {
        ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
        bind.Bind(i, false, std::move(p));
        ASSIGN_OR_RETURN(DeviceBuffer g,
                         FetchZeroed(GradId(name_of(i)), size_of(i), resident_, op));
        bind.Bind(i, true, std::move(g));
      }
      if (scratch.bytes() == 0) {
        ASSIGN_OR_RETURN(
            scratch, Allocate(model_->LayerScratchBytes(B, T), op + ": activation scratch"));
      }
      evict_before_ = {l, 0};
      for (int64_t a = 0; a < A; ++a) {
        ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(l, a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer dy, Fetch(DyId(a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer dx, NewBuffer(act, false, op + ": input gradient"));
        {
          Timer busy(&stats_.compute_seconds, Tracing(), "compute", absl::StrCat(op, ", mb ", a),
                     step_start_);
          RETURN_IF_ERROR(model_->DecoderLayerBackward(static_cast<int>(l), x.data.data(),
                                                       dy.data.data(), dx.data.data(), B, T));
        }
        RETURN_IF_ERROR(DropActivation(ActId(l, a), std::move(x)));
        // dx replaces dy under the same id.
        RETURN_IF_ERROR(DropActivation(DyId(a), std::move(dy)));
        RETURN_IF_ERROR(StoreActivation(DyId(a), std::move(dx)));
      }
      for (int i = first; i < first + kLayerTensors; ++i) {
        RETURN_IF_ERROR(Return(ParamId(name_of(i)), bind.Unbind(i, false), ptier, false));
        DeviceBuffer g = bind.Unbind(i, true);
        GradDone(i, g);
        RETURN_IF_ERROR(Return(GradId(name_of(i)), std::move(g), gtier, true));
        OverlapUpdate(i);
      }
    }
    model_->ReleaseLayerScratch();
  }

  // Embedding backward (adds to the LM head's contribution when tied).
  {
    const std::string op = "embedding backward";
    Binding bind(this);
    IssueScheduled(static_cast<int>(2 * L + 2));
    const std::string id = GradId(name_of(0));
    DeviceBuffer g;
    if (tied) {
      ASSIGN_OR_RETURN(g, Fetch(id, size_of(0), op));
    } else {
      ASSIGN_OR_RETURN(g, FetchZeroed(id, size_of(0), resident_, op));
    }
    bind.Bind(0, true, std::move(g));
    for (int64_t a = 0; a < A; ++a) {
      ASSIGN_OR_RETURN(DeviceBuffer dy, Fetch(DyId(a), act, op));
      {
        Timer busy(&stats_.compute_seconds, Tracing(), "compute", absl::StrCat(op, ", mb ", a),
                   step_start_);
        RETURN_IF_ERROR(model_->EmbedBackward(inputs_.data() + a * n, B, T, dy.data.data()));
      }
      RETURN_IF_ERROR(DropActivation(DyId(a), std::move(dy)));
    }
    g = bind.Unbind(0, true);
    GradDone(0, g);
    RETURN_IF_ERROR(Return(id, std::move(g), gtier, true));
    OverlapUpdate(0);
  }
  ids_alloc.Release();

  // Data parallel: the step's gradient and loss are the replicas' together (on the device when
  // each replica keeps its state resident, else in the home).
  if (shared_state_) {
    RETURN_IF_ERROR(ReduceSharedGradients(&loss_sum));
  } else if (offload_.replica.collective != nullptr) {
    RETURN_IF_ERROR(SumAcrossReplicas(&loss_sum));
  }

  // Global gradient norm, exactly as GlobalGradNorm: per-tensor sums (taken
  // on the device as each gradient completed) added in NamedTensors order.
  double total = 0;
  for (int i = 0; i < num_tensors; ++i) total += grad_sq_[i];
  const double grad_norm = std::sqrt(total);
  const double loss = loss_sum / static_cast<double>(global_a);
  if (!std::isfinite(grad_norm)) {
    // (Step ignores the overlapped updates of a failed step.)
    RETURN_IF_ERROR(Flush());
    ModelParams grads = AllocateParams<float>(c);
    RETURN_IF_ERROR(GatherClass("grad/", &grads));
    return CheckGradNormFinite(step_, grad_norm, loss, NamedTensors(c, &grads));
  }
  // As ClipGradNorm.
  const double max_norm = options_.optimizer.grad_clip;
  const double clip_coef = max_norm / (grad_norm + 1e-6);
  const bool clip = max_norm > 0 && clip_coef < 1.0;
  const float coef = static_cast<float>(clip_coef);
  const double lr = overlap_lr_;
  const bool overlapped = overlap_;
  // Unclipped, the overlapped updates are the synchronous ones.
  FinishOverlap(!clip);
  last_step_clipped_ = clip;
  if (overlapped && !clip) {
    RETURN_IF_ERROR(transfers_->status());
  } else if (!resident_ && (offload_.host_optimizer || shared_state_)) {
    RETURN_IF_ERROR(HostOptimizer(lr, clip, coef));
  } else {
    RETURN_IF_ERROR(DeviceOptimizer(lr, clip, coef));
  }
  if (shared_state_) {
    // The next step reads what every replica updated.
    RETURN_IF_ERROR(Flush());
    std::vector<double> none;
    RETURN_IF_ERROR(ReplicaBarrier(3, &none));
  }

  OffloadStepResult r;
  r.step = step_;
  r.loss = loss;
  r.lr = lr;
  r.grad_norm = grad_norm;
  r.tokens = global_a * B * T;
  r.device_memory_budget_bytes = mem_.budget();
  r.device_memory_peak_bytes = mem_.peak();
  r.bytes_home_to_device = bytes_in_;
  r.bytes_device_to_home = bytes_out_;
  r.compute_seconds = stats_.compute_seconds;
  r.stall_transfer_seconds = stats_.stall_transfer_seconds;
  r.stall_optimizer_seconds = stats_.stall_optimizer_seconds;
  r.stall_memory_seconds = stats_.stall_memory_seconds;
  r.home_reads = stats_.home_reads;
  r.prefetched_reads = stats_.prefetched_reads;
  r.prefetch_hits = stats_.prefetch_hits;
  r.optimizer_overlapped = overlapped;
  r.optimizer_overlap_kept = overlapped && !clip;
  r.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

absl::Status OffloadTrainer::ReduceSharedGradients(double *loss_sum) {
  Collective *const replicas = offload_.replica.collective;
  // Every replica's gradients of the step are home before any replica reads another's.
  RETURN_IF_ERROR(Flush());
  std::vector<double> loss = {*loss_sum};
  RETURN_IF_ERROR(ReplicaBarrier(1, &loss));
  *loss_sum = loss[0];
  TensorHome *const shared = offload_.host_home != nullptr ? offload_.host_home : offload_.home;
  std::vector<float> sum, part;
  {
    Timer busy(&stats_.compute_seconds, Tracing(), "compute", "sum gradients across replicas",
               step_start_);
    for (size_t i = 0; i < param_slots_.size(); ++i) {
      grad_sq_[i] = 0;
      if (!Owns(static_cast<int>(i))) continue;
      const std::string id = GradId(param_slots_[i].name);
      const int64_t size = Numel(param_slots_[i]);
      sum.resize(size);
      part.resize(size);
      // In rank order: the sum is the same whichever replica owns the tensor.
      for (int r = 0; r < replicas->size(); ++r) {
        float *dst = r == 0 ? sum.data() : part.data();
        RETURN_IF_ERROR(shared->Get(ReplicaPrefix(r) + id, dst, size));
        if (r > 0) {
          pool_->ParallelFor(size, 1 << 14, [&](int64_t b, int64_t e) {
            for (int64_t j = b; j < e; ++j) sum[j] += part[j];
          });
        }
      }
      RETURN_IF_ERROR(replica_host_home_->Put(id, sum.data(), size, offload_.gradients_tier));
      bytes_in_ += kF * size * (replicas->size() - 1);
      grad_sq_[i] = SquareSum(sum.data(), size);
    }
  }
  // Each tensor's square sum comes from its owner (the others add zeros): every replica gets
  // the same bits, hence the same norm and clipping.
  return ReplicaBarrier(2, &grad_sq_);
}

absl::Status OffloadTrainer::SumAcrossReplicas(double *loss_sum) {
  Timer busy(&stats_.compute_seconds, Tracing(), "compute", "sum gradients across replicas",
             step_start_);
  std::vector<DeviceBuffer *> grads;
  int64_t total = 0;
  for (const NamedTensor<float> &slot : param_slots_) {
    auto it = device_.find(GradId(slot.name));
    if (it == device_.end()) {
      return absl::InternalError(absl::StrCat("data parallel: the gradient of ", slot.name,
                                              " is not on the device"));
    }
    grads.push_back(&it->second);
    total += static_cast<int64_t>(it->second.data.size());
  }
  std::vector<float> flat;
  flat.reserve(total);
  for (const DeviceBuffer *g : grads) flat.insert(flat.end(), g->data.begin(), g->data.end());
  std::vector<double> scalars = {*loss_sum};
  RETURN_IF_ERROR(offload_.replica.collective->SumAcrossReplicas(step_, absl::MakeSpan(flat),
                                                                 &scalars));
  *loss_sum = scalars[0];
  int64_t at = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    std::vector<float> &g = grads[i]->data;
    std::copy(flat.begin() + at, flat.begin() + at + static_cast<int64_t>(g.size()), g.begin());
    at += static_cast<int64_t>(g.size());
    GradDone(static_cast<int>(i), *grads[i]);
  }
  return absl::OkStatus();
}

void OffloadTrainer::GradDone(int i, const DeviceBuffer &g) {
  Timer busy(&stats_.compute_seconds);
  grad_sq_[i] = SquareSum(g.data.data(), static_cast<int64_t>(g.data.size()));
}

absl::Status OffloadTrainer::DeviceOptimizer(double lr, bool clip, float coef) {
  const HomeTier ptier = offload_.parameters_tier, gtier = offload_.gradients_tier;
  const HomeTier otier = offload_.optimizer_state_tier;
  for (size_t i = 0; i < param_slots_.size(); ++i) {
    const std::string &name = param_slots_[i].name;
    const std::string op = absl::StrCat("optimizer update of ", name);
    const int64_t size = Numel(param_slots_[i]);
    ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer g, Fetch(GradId(name), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer m, Fetch(ExpAvgId(name), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer v, Fetch(ExpAvgSqId(name), size, op));
    {
      Timer busy(&stats_.compute_seconds, Tracing(), "compute", op, step_start_);
      if (clip) {
        for (float &x : g.data) x *= coef;
      }
      const AdamWHyper hy = AdamWHyperFor(options_.optimizer, lr, param_slots_[i].shape.size());
      float *pp = p.data.data();
      const float *gp = g.data.data();
      float *mp = m.data.data();
      float *vp = v.data.data();
      const int64_t s = step_ + 1;
      pool_->ParallelFor(size, 1 << 14, [&](int64_t b, int64_t e) {
        AdamWUpdate(pp + b, gp + b, mp + b, vp + b, e - b, hy, s);
      });
    }
    RETURN_IF_ERROR(Return(ParamId(name), std::move(p), ptier, true));
    // The home keeps the unclipped gradient; nothing reads it before the next
    // backward.
    RETURN_IF_ERROR(Return(GradId(name), std::move(g), gtier, false));
    RETURN_IF_ERROR(Return(ExpAvgId(name), std::move(m), otier, true));
    RETURN_IF_ERROR(Return(ExpAvgSqId(name), std::move(v), otier, true));
  }
  return absl::OkStatus();
}

absl::Status OffloadTrainer::HostOptimizer(double lr, bool clip, float coef) {
  // Tensor by tensor in NamedTensors order, which is the order the next
  // forward reads parameters in: the embedding and layer 0 are ready first.
  for (size_t i = 0; i < param_slots_.size(); ++i) {
    if (!Owns(static_cast<int>(i))) continue;
    HostAdamW(static_cast<int>(i), lr, clip, coef, generation_[i], generation_[i]);
  }
  return transfers_->status();
}

std::string OffloadTrainer::Generation(const std::string &id, int generation) {
  return generation == 0 ? id : id + "@1";
}

void OffloadTrainer::HostAdamW(int i, double lr, bool clip, float coef, int from, int to) {
  const std::string &name = param_slots_[i].name;
  const int64_t size = Numel(param_slots_[i]);
  const AdamWHyper hy = AdamWHyperFor(options_.optimizer, lr, param_slots_[i].shape.size());
  const HomeTier ptier = offload_.parameters_tier, otier = offload_.optimizer_state_tier;
  const int64_t s = step_ + 1;
  const std::string pid = ParamId(name), gid = GradId(name);
  const std::string mid = ExpAvgId(name), vid = ExpAvgSqId(name);
  // Reads of the tensors wait for the job. It names the stored generations itself: the ids
  // may point elsewhere by the time it runs.
  transfers_->HostJob({gid}, {pid, mid, vid}, [=](TensorHome *host) -> absl::Status {
    std::vector<float> p(size), g(size), m(size), v(size);
    RETURN_IF_ERROR(host->Get(Generation(pid, from), p.data(), size));
    RETURN_IF_ERROR(host->Get(gid, g.data(), size));
    RETURN_IF_ERROR(host->Get(Generation(mid, from), m.data(), size));
    RETURN_IF_ERROR(host->Get(Generation(vid, from), v.data(), size));
    if (clip) {
      for (float &x : g) x *= coef;
    }
    AdamWUpdate(p.data(), g.data(), m.data(), v.data(), size, hy, s);
    RETURN_IF_ERROR(host->Put(Generation(pid, to), p.data(), size, ptier));
    RETURN_IF_ERROR(host->Put(Generation(mid, to), m.data(), size, otier));
    return host->Put(Generation(vid, to), v.data(), size, otier);
  });
}

void OffloadTrainer::OverlapUpdate(int i) {
  if (!overlap_) return;
  HostAdamW(i, overlap_lr_, false, 1.0f, generation_[i], 1 - generation_[i]);
  overlapped_.push_back(i);
}

void OffloadTrainer::FinishOverlap(bool keep) {
  if (keep) {
    for (int i : overlapped_) {
      const std::string &name = param_slots_[i].name;
      generation_[i] = 1 - generation_[i];
      for (const std::string &id : {ParamId(name), ExpAvgId(name), ExpAvgSqId(name)}) {
        aliases_.Set(id, Generation(id, generation_[i]));
      }
    }
  }
  // The other generation stays stored: the next overlapped update overwrites it, which costs
  // the memstore less than creating and freeing tensors every step.
  overlapped_.clear();
}

absl::Status OffloadTrainer::GatherClass(const std::string &prefix, ModelParams *out) {
  RETURN_IF_ERROR(Flush());
  for (NamedTensor<float> &t : NamedTensors(options_.model, out)) {
    const std::string id = prefix + t.name;
    auto it = device_.find(id);
    if (it != device_.end()) {
      *t.data = it->second.data;
    } else {
      RETURN_IF_ERROR(home_->Get(id, t.data->data(), static_cast<int64_t>(t.data->size())));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelParams> OffloadTrainer::GatherParams() {
  ModelParams p = AllocateParams<float>(options_.model);
  RETURN_IF_ERROR(GatherClass("param/", &p));
  return p;
}

absl::Status OffloadTrainer::GatherOptimizerState(ModelParams *exp_avg, ModelParams *exp_avg_sq) {
  *exp_avg = AllocateParams<float>(options_.model);
  *exp_avg_sq = AllocateParams<float>(options_.model);
  RETURN_IF_ERROR(GatherClass("exp_avg/", exp_avg));
  return GatherClass("exp_avg_sq/", exp_avg_sq);
}

absl::Status OffloadTrainer::Export(const std::string &dir) {
  // One tensor at a time from where it lives: the state may be far larger than host memory.
  RETURN_IF_ERROR(Flush());
  std::map<std::string, int64_t> numel;
  for (const NamedTensor<float> &t : param_slots_) numel[t.name] = Numel(t);
  auto from = [this, &numel](std::string (*id_of)(const std::string &)) {
    return TensorSource([this, &numel, id_of](const std::string &name, float *dst) {
      const std::string id = id_of(name);
      auto it = device_.find(id);
      if (it != device_.end()) {
        std::copy(it->second.data.begin(), it->second.data.end(), dst);
        return absl::OkStatus();
      }
      return home_->Get(id, dst, numel.at(name));
    });
  };
  RETURN_IF_ERROR(ExportHfDirectory(dir, options_.model, from(ParamId)));
  return SaveOptimizerState(dir + "/" + kOptimizerFile, options_.model, from(ExpAvgId),
                            from(ExpAvgSqId), step_);
}

}  // namespace lumen::engine
