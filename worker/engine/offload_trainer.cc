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
  resident_ =
      4 * kF * ParameterCount(c) + ws + max_acts * act_bytes <= offload_.device_budget_bytes;
  max_resident_acts_ =
      resident_ ? max_acts
                : std::clamp<int64_t>((offload_.device_budget_bytes - ws) / act_bytes, 0, max_acts);
  if (!resident_ && offload_.home == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offload.home is null but the training state (", FormatBytes(TrainingStateBytes()),
        ") does not fit the device budget ", FormatBytes(offload_.device_budget_bytes)));
  }

  // Initialise exactly as Trainer, then move every tensor to where it lives.
  ModelParams init;
  if (!options_.init_from.empty()) {
    init = AllocateParams<float>(c);
    RETURN_IF_ERROR(LoadWeights(options_.init_from, c, &init));
  } else {
    InitParams(c, t.seed, &init);
  }
  for (NamedTensor<float> &p : NamedTensors(c, &init)) {
    const int64_t size = Numel(p);
    const std::vector<float> zeros(size, 0.0f);
    for (auto [id, src, tier] :
         {std::tuple<std::string, const float *, HomeTier>{ParamId(p.name), p.data->data(),
                                                           offload_.parameters_tier},
          {ExpAvgId(p.name), zeros.data(), offload_.optimizer_state_tier},
          {ExpAvgSqId(p.name), zeros.data(), offload_.optimizer_state_tier}}) {
      if (resident_) {
        ASSIGN_OR_RETURN(DeviceBuffer buf,
                         NewBuffer(size, true, absl::StrCat("initial placement of ", id)));
        std::copy(src, src + size, buf.data.begin());
        device_[id] = std::move(buf);
      } else {
        RETURN_IF_ERROR(offload_.home->Put(id, src, size, tier));
      }
    }
    std::vector<float>().swap(*p.data);
  }
  return absl::OkStatus();
}

int64_t OffloadTrainer::TrainingStateBytes() const {
  const ModelConfig &c = options_.model;
  const TrainConfig &t = options_.train;
  return 4 * kF * ParameterCount(c) + kF * (c.num_hidden_layers + 1) * t.grad_accum_steps *
                                          t.micro_batch_size * t.seq_len * c.hidden_size;
}

std::vector<OffloadTrainer::OpSize> OffloadTrainer::OpWorkingSets() const {
  const ModelConfig &c = options_.model;
  const TrainConfig &t = options_.train;
  const int64_t h = c.hidden_size, L = c.num_hidden_layers;
  const int64_t n = t.micro_batch_size * t.seq_len;
  const int64_t act = kF * n * h;
  const int64_t ids = 2 * static_cast<int64_t>(sizeof(int32_t)) * t.grad_accum_steps * n;
  const int64_t embed = kF * c.vocab_size * h;
  const int64_t head_params = embed + kF * h;  // LM head (or tied embedding) + final norm
  const int64_t layer_params =
      kF * (ParameterCount(c) - c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) - h) / L;
  const int64_t layer_scratch = model_->LayerScratchBytes(t.micro_batch_size, t.seq_len);
  const int64_t head_scratch = model_->HeadScratchBytes(t.micro_batch_size, t.seq_len);
  int64_t largest = 0;
  for (const NamedTensor<float> &s : param_slots_) largest = std::max(largest, Numel(s));
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

absl::StatusOr<OffloadTrainer::DeviceBuffer> OffloadTrainer::NewBuffer(int64_t n, bool resident,
                                                                       const std::string &op) {
  DeviceBuffer buf;
  ASSIGN_OR_RETURN(buf.alloc, mem_.Allocate(kF * n, op));
  buf.data.assign(n, 0.0f);
  buf.resident = resident;
  return buf;
}

absl::StatusOr<OffloadTrainer::DeviceBuffer> OffloadTrainer::Fetch(const std::string &id, int64_t n,
                                                                   const std::string &op) {
  auto it = device_.find(id);
  if (it != device_.end()) {
    DeviceBuffer buf = std::move(it->second);
    device_.erase(it);
    return buf;
  }
  ASSIGN_OR_RETURN(DeviceBuffer buf, NewBuffer(n, false, absl::StrCat(op, ": ", id)));
  RETURN_IF_ERROR(offload_.home->Get(id, buf.data.data(), n));
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
  return NewBuffer(n, resident, absl::StrCat(op, ": ", id));
}

absl::Status OffloadTrainer::Return(const std::string &id, DeviceBuffer buf, HomeTier tier,
                                    bool dirty) {
  if (buf.resident) {
    device_[id] = std::move(buf);
    return absl::OkStatus();
  }
  if (dirty) {
    RETURN_IF_ERROR(
        offload_.home->Put(id, buf.data.data(), static_cast<int64_t>(buf.data.size()), tier));
    bytes_out_ += kF * static_cast<int64_t>(buf.data.size());
  }
  return absl::OkStatus();
}

int64_t OffloadTrainer::ResidentActivations() const {
  int64_t count = 0;
  for (auto it = device_.lower_bound("act/");
       it != device_.end() && it->first.rfind("act/", 0) == 0; ++it) {
    ++count;
  }
  return count;
}

absl::Status OffloadTrainer::StoreActivation(const std::string &id, DeviceBuffer buf) {
  buf.resident = ResidentActivations() < max_resident_acts_;
  return Return(id, std::move(buf), offload_.activations_tier, true);
}

absl::Status OffloadTrainer::DropActivation(const std::string &id, DeviceBuffer buf) {
  if (!buf.resident) RETURN_IF_ERROR(offload_.home->Free(id));
  return absl::OkStatus();
}

void OffloadTrainer::DropResidentActivations() {
  for (auto it = device_.lower_bound("act/");
       it != device_.end() && it->first.rfind("act/", 0) == 0;) {
    it = device_.erase(it);
  }
}

absl::StatusOr<OffloadStepResult> OffloadTrainer::Step() {
  bytes_in_ = bytes_out_ = 0;
  mem_.ResetPeak();
  absl::StatusOr<OffloadStepResult> r = RunStep();
  // A failed step leaves activations behind; they are scratch.
  DropResidentActivations();
  if (r.ok()) ++step_;
  return r;
}

absl::StatusOr<OffloadStepResult> OffloadTrainer::RunStep() {
  const auto start = std::chrono::steady_clock::now();
  const TrainConfig &t = options_.train;
  const ModelConfig &c = options_.model;
  const int64_t A = t.grad_accum_steps, B = t.micro_batch_size, T = t.seq_len;
  const int64_t n = B * T, h = c.hidden_size, L = c.num_hidden_layers;
  const int64_t act = n * h;
  const bool tied = c.tie_word_embeddings;
  const HomeTier ptier = offload_.parameters_tier, gtier = offload_.gradients_tier;
  const HomeTier otier = offload_.optimizer_state_tier;
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(A));
  const int num_tensors = static_cast<int>(param_slots_.size());
  const int norm_index = 1 + kLayerTensors * static_cast<int>(L);
  const int head_index = tied ? 0 : norm_index + 1;
  auto size_of = [&](int i) { return Numel(param_slots_[i]); };
  auto name_of = [&](int i) -> const std::string & { return param_slots_[i].name; };

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
                   mem_.Allocate(2 * static_cast<int64_t>(sizeof(int32_t)) * A * n,
                                 absl::StrCat("step ", step_, ": token ids")));
  for (int64_t a = 0; a < A; ++a) {
    RETURN_IF_ERROR(
        data_->ReadBatch(step_, a, A, B, inputs_.data() + a * n, targets_.data() + a * n));
  }

  // Embedding forward for every micro-batch.
  {
    const std::string op = "embedding forward";
    Binding bind(this);
    ASSIGN_OR_RETURN(DeviceBuffer e, Fetch(ParamId(name_of(0)), size_of(0), op));
    bind.Bind(0, false, std::move(e));
    for (int64_t a = 0; a < A; ++a) {
      ASSIGN_OR_RETURN(DeviceBuffer x, NewBuffer(act, false, op + ": output"));
      RETURN_IF_ERROR(model_->EmbedForward(inputs_.data() + a * n, B, T, x.data.data()));
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
      for (int i = first; i < first + kLayerTensors; ++i) {
        ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
        bind.Bind(i, false, std::move(p));
      }
      if (scratch.bytes() == 0) {
        ASSIGN_OR_RETURN(
            scratch, mem_.Allocate(model_->LayerScratchBytes(B, T), op + ": activation scratch"));
      }
      for (int64_t a = 0; a < A; ++a) {
        ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(l, a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer y, NewBuffer(act, false, op + ": output"));
        RETURN_IF_ERROR(
            model_->DecoderLayerForward(static_cast<int>(l), x.data.data(), y.data.data(), B, T));
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
    for (int i : {norm_index, head_index}) {
      ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
      bind.Bind(i, false, std::move(p));
      ASSIGN_OR_RETURN(DeviceBuffer g, FetchZeroed(GradId(name_of(i)), size_of(i), resident_, op));
      bind.Bind(i, true, std::move(g));
    }
    ASSIGN_OR_RETURN(DeviceMemory::Allocation scratch,
                     mem_.Allocate(model_->HeadScratchBytes(B, T), op + ": scratch and logits"));
    for (int64_t a = 0; a < A; ++a) {
      ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(L, a), act, op));
      ASSIGN_OR_RETURN(DeviceBuffer dy, NewBuffer(act, false, op + ": input gradient"));
      ASSIGN_OR_RETURN(const double loss,
                       model_->HeadForwardBackward(x.data.data(), targets_.data() + a * n, B, T,
                                                   grad_scale, dy.data.data()));
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
      RETURN_IF_ERROR(Return(GradId(name_of(i)), bind.Unbind(i, true), gtier, true));
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
      for (int i = first; i < first + kLayerTensors; ++i) {
        ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size_of(i), op));
        bind.Bind(i, false, std::move(p));
        ASSIGN_OR_RETURN(DeviceBuffer g,
                         FetchZeroed(GradId(name_of(i)), size_of(i), resident_, op));
        bind.Bind(i, true, std::move(g));
      }
      if (scratch.bytes() == 0) {
        ASSIGN_OR_RETURN(
            scratch, mem_.Allocate(model_->LayerScratchBytes(B, T), op + ": activation scratch"));
      }
      for (int64_t a = 0; a < A; ++a) {
        ASSIGN_OR_RETURN(DeviceBuffer x, Fetch(ActId(l, a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer dy, Fetch(DyId(a), act, op));
        ASSIGN_OR_RETURN(DeviceBuffer dx, NewBuffer(act, false, op + ": input gradient"));
        RETURN_IF_ERROR(model_->DecoderLayerBackward(static_cast<int>(l), x.data.data(),
                                                     dy.data.data(), dx.data.data(), B, T));
        RETURN_IF_ERROR(DropActivation(ActId(l, a), std::move(x)));
        // dx replaces dy under the same id.
        RETURN_IF_ERROR(DropActivation(DyId(a), std::move(dy)));
        RETURN_IF_ERROR(StoreActivation(DyId(a), std::move(dx)));
      }
      for (int i = first; i < first + kLayerTensors; ++i) {
        RETURN_IF_ERROR(Return(ParamId(name_of(i)), bind.Unbind(i, false), ptier, false));
        RETURN_IF_ERROR(Return(GradId(name_of(i)), bind.Unbind(i, true), gtier, true));
      }
    }
    model_->ReleaseLayerScratch();
  }

  // Embedding backward (adds to the LM head's contribution when tied).
  {
    const std::string op = "embedding backward";
    Binding bind(this);
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
      RETURN_IF_ERROR(model_->EmbedBackward(inputs_.data() + a * n, B, T, dy.data.data()));
      RETURN_IF_ERROR(DropActivation(DyId(a), std::move(dy)));
    }
    RETURN_IF_ERROR(Return(id, bind.Unbind(0, true), gtier, true));
  }
  ids_alloc.Release();

  // Global gradient norm, exactly as GlobalGradNorm over the tensors in
  // NamedTensors order.
  double total = 0;
  for (int i = 0; i < num_tensors; ++i) {
    ASSIGN_OR_RETURN(DeviceBuffer g, Fetch(GradId(name_of(i)), size_of(i), "gradient norm"));
    const float *gp = g.data.data();
    total += kernels::LaneSum(size_of(i),
                              [gp](int64_t j) { return static_cast<double>(gp[j]) * gp[j]; });
    RETURN_IF_ERROR(Return(GradId(name_of(i)), std::move(g), gtier, false));
  }
  const double grad_norm = std::sqrt(total);
  const double loss = loss_sum / static_cast<double>(A);
  if (!std::isfinite(grad_norm)) {
    ModelParams grads = AllocateParams<float>(c);
    RETURN_IF_ERROR(GatherClass("grad/", &grads));
    return CheckGradNormFinite(step_, grad_norm, loss, NamedTensors(c, &grads));
  }
  // As ClipGradNorm.
  const double max_norm = options_.optimizer.grad_clip;
  const double clip_coef = max_norm / (grad_norm + 1e-6);
  const bool clip = max_norm > 0 && clip_coef < 1.0;
  const float coef = static_cast<float>(clip_coef);

  // AdamW, tensor by tensor.
  const double lr = LearningRate(options_.optimizer, step_, t.steps);
  for (int i = 0; i < num_tensors; ++i) {
    const std::string op = absl::StrCat("optimizer update of ", name_of(i));
    const int64_t size = size_of(i);
    ASSIGN_OR_RETURN(DeviceBuffer p, Fetch(ParamId(name_of(i)), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer g, Fetch(GradId(name_of(i)), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer m, Fetch(ExpAvgId(name_of(i)), size, op));
    ASSIGN_OR_RETURN(DeviceBuffer v, Fetch(ExpAvgSqId(name_of(i)), size, op));
    if (clip) {
      for (float &x : g.data) x *= coef;
    }
    AdamWHyper hy;
    hy.lr = lr;
    hy.beta1 = options_.optimizer.beta1;
    hy.beta2 = options_.optimizer.beta2;
    hy.eps = options_.optimizer.eps;
    hy.weight_decay = param_slots_[i].shape.size() >= 2 ? options_.optimizer.weight_decay : 0.0;
    float *pp = p.data.data();
    const float *gp = g.data.data();
    float *mp = m.data.data();
    float *vp = v.data.data();
    const int64_t s = step_ + 1;
    pool_->ParallelFor(size, 1 << 14, [&](int64_t b, int64_t e) {
      AdamWUpdate(pp + b, gp + b, mp + b, vp + b, e - b, hy, s);
    });
    RETURN_IF_ERROR(Return(ParamId(name_of(i)), std::move(p), ptier, true));
    // The home keeps the unclipped gradient; nothing reads it before the next
    // backward.
    RETURN_IF_ERROR(Return(GradId(name_of(i)), std::move(g), gtier, false));
    RETURN_IF_ERROR(Return(ExpAvgId(name_of(i)), std::move(m), otier, true));
    RETURN_IF_ERROR(Return(ExpAvgSqId(name_of(i)), std::move(v), otier, true));
  }

  OffloadStepResult r;
  r.step = step_;
  r.loss = loss;
  r.lr = lr;
  r.grad_norm = grad_norm;
  r.tokens = A * B * T;
  r.device_memory_budget_bytes = mem_.budget();
  r.device_memory_peak_bytes = mem_.peak();
  r.bytes_home_to_device = bytes_in_;
  r.bytes_device_to_home = bytes_out_;
  r.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

absl::Status OffloadTrainer::GatherClass(const std::string &prefix, ModelParams *out) {
  for (NamedTensor<float> &t : NamedTensors(options_.model, out)) {
    const std::string id = prefix + t.name;
    auto it = device_.find(id);
    if (it != device_.end()) {
      *t.data = it->second.data;
    } else {
      RETURN_IF_ERROR(offload_.home->Get(id, t.data->data(), static_cast<int64_t>(t.data->size())));
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
  {
    ASSIGN_OR_RETURN(ModelParams params, GatherParams());
    RETURN_IF_ERROR(ExportHfDirectory(dir, options_.model, params));
  }
  ModelParams m, v;
  RETURN_IF_ERROR(GatherOptimizerState(&m, &v));
  return SaveOptimizerState(dir + "/" + kOptimizerFile, options_.model, m, v, step_);
}

}  // namespace lumen::engine
