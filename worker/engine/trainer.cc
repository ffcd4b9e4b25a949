#include "worker/engine/trainer.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/checkpoint.h"

namespace lumen::engine {

namespace {

// "nan", "inf" or "-inf" for a non-finite value.
const char* FiniteName(double x) {
  if (std::isnan(x)) return "nan";
  return x > 0 ? "inf" : "-inf";
}

}  // namespace

absl::Status CheckGradNormFinite(int64_t step, double grad_norm, double loss,
                                 const std::vector<NamedTensor<float>>& grads) {
  if (std::isfinite(grad_norm)) return absl::OkStatus();
  std::string culprit = "(none: the sum of squares overflowed)";
  for (const NamedTensor<float>& g : grads) {
    if (!std::all_of(g.data->begin(), g.data->end(), [](float x) { return std::isfinite(x); })) {
      culprit = g.name;
      break;
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "step ", step, ": gradient norm is ", FiniteName(grad_norm), " (loss ", loss,
      "; first non-finite gradient in ", culprit,
      "); training diverged. Parameters and optimizer state are unchanged; lower optimizer.lr "
      "or set optimizer.grad_clip"));
}

void InitParams(const ModelConfig& config, uint64_t seed, ModelParams* params,
                ThreadPool* pool) {
  *params = AllocateParams<float>(config);
  RandomWeights source(config, seed, pool);
  for (NamedTensor<float>& t : NamedTensors(config, params)) {
    // In NamedTensors order, the order RandomWeights asks for: it cannot refuse.
    absl::Status read = source.Read(t.name, t.data->data());
    (void)read;
  }
}

RandomWeights::RandomWeights(const ModelConfig& config, uint64_t seed, ThreadPool* pool)
    : init_std_(config.init_std), pool_(pool), rng_(seed) {
  ModelParams shapes;
  shapes.layers.resize(config.num_hidden_layers);
  for (const NamedTensor<float>& t : NamedTensors(config, &shapes)) {
    int64_t size = 1;
    for (int64_t d : t.shape) size *= d;
    order_.push_back(Expected{t.name, size, t.shape.size() != 1});
  }
}

absl::Status RandomWeights::Read(const std::string& name, float* dst) {
  if (next_ >= order_.size() || order_[next_].name != name) {
    return absl::FailedPreconditionError(absl::StrCat(
        "random initialisation: asked for ", name, " but the next tensor in order is ",
        next_ < order_.size() ? order_[next_].name : std::string("none (all were handed out)")));
  }
  const Expected& e = order_[next_++];
  if (e.matrix) {
    Draw(dst, e.size);
  } else {
    std::fill(dst, dst + e.size, 1.0f);  // norm weights draw nothing
  }
  return absl::OkStatus();
}

void RandomWeights::Draw(float* dst, int64_t n) {
  int64_t first = 0;  // dst[first] is the first value of a new pair
  if (n > 0 && position_ % 2 == 1) {
    dst[0] = spare_;
    first = 1;
  }
  position_ += n;
  const double init_std = init_std_;
  // Pairs [pb, pe) of this call from raw numbers `raw` (raw[0] is pair `p0`'s first): pair p
  // fills dst[first + 2p] and the value after it, or keeps that one as the spare at the end.
  auto values = [&](const uint64_t* raw, int64_t p0, int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const uint64_t x1 = raw[2 * (p - p0)], x2 = raw[2 * (p - p0) + 1];
      const double u1 = static_cast<double>((x1 >> 11) + 1) * 0x1.0p-53;
      const double u2 = static_cast<double>(x2 >> 11) * 0x1.0p-53;
      const double r = std::sqrt(-2.0 * std::log(u1));
      const int64_t k = first + 2 * p;
      dst[k] = static_cast<float>(init_std * (r * std::cos(2.0 * M_PI * u2)));
      const float z1 = static_cast<float>(init_std * (r * std::sin(2.0 * M_PI * u2)));
      if (k + 1 < n) {
        dst[k + 1] = z1;
      } else {
        spare_ = z1;
      }
    }
  };
  const int64_t pairs = (n - first + 1) / 2;
  if (pool_ == nullptr || pool_->num_threads() <= 1) {
    constexpr int64_t kPairs = 4096;
    std::vector<uint64_t> raw(2 * kPairs);
    for (int64_t p0 = 0; p0 < pairs; p0 += kPairs) {
      const int64_t count = std::min(kPairs, pairs - p0);
      for (int64_t i = 0; i < 2 * count; ++i) raw[i] = rng_();
      values(raw.data(), p0, p0, p0 + count);
    }
    return;
  }
  // Blocks of pairs: this thread draws the next block while the pool computes this one.
  constexpr int64_t kBlock = int64_t{1} << 20;
  const int64_t blocks = (pairs + kBlock - 1) / kBlock;
  std::vector<uint64_t> raw[2];
  for (int64_t b = 0; b < std::min<int64_t>(blocks, 2); ++b) {
    raw[b].resize(2 * std::min(kBlock, pairs - b * kBlock));
  }
  auto draw = [&](int64_t block) {
    const int64_t count = std::min(kBlock, pairs - block * kBlock);
    uint64_t* out = raw[block % 2].data();
    for (int64_t i = 0; i < 2 * count; ++i) out[i] = rng_();
  };
  if (blocks > 0) draw(0);
  for (int64_t b = 0; b < blocks; ++b) {
    std::thread next;
    if (b + 1 < blocks) next = std::thread(draw, b + 1);
    const int64_t p0 = b * kBlock, count = std::min(kBlock, pairs - p0);
    const uint64_t* block_raw = raw[b % 2].data();
    pool_->ParallelFor(count, 4096, [&](int64_t pb, int64_t pe) {
      values(block_raw, p0, p0 + pb, p0 + pe);
    });
    if (next.joinable()) next.join();
  }
}

Trainer::Trainer(const TrainerOptions& options) : options_(options) {}

absl::Status ValidateTrainerOptions(const TrainerOptions& options) {
  RETURN_IF_ERROR(CheckModelConfig(options.model));
  const TrainConfig& t = options.train;
  if (t.seq_len <= 0 || t.micro_batch_size <= 0 || t.grad_accum_steps <= 0 || t.steps < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train: seq_len ", t.seq_len, ", micro_batch_size ", t.micro_batch_size,
        ", grad_accum_steps ", t.grad_accum_steps, " must be > 0 and steps ", t.steps, " >= 0"));
  }
  if (t.seq_len > options.model.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("train.seq_len ", t.seq_len, " exceeds max_position_embeddings ",
                     options.model.max_position_embeddings));
  }
  if (options.optimizer.warmup_steps < 0) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer.warmup_steps ",
                                                   options.optimizer.warmup_steps, " < 0"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerOptions& options) {
  RETURN_IF_ERROR(ValidateTrainerOptions(options));
  const TrainConfig& t = options.train;
  std::unique_ptr<Trainer> tr(new Trainer(options));
  const int threads = std::max(1, options.num_threads);
  // Matrix products are split over pool_ by the model, each chunk a single-threaded OpenBLAS
  // call; OpenBLAS's own threads would compete with the pool for the same cores.
  openblas_set_num_threads(1);
  tr->pool_ = std::make_unique<ThreadPool>(threads);
  ASSIGN_OR_RETURN(tr->data_,
                   TokenDataset::Open(options.data, t.seq_len, options.model.vocab_size));
  tr->model_ = std::make_unique<LlamaModel>(options.model, options.activation_checkpointing,
                                            tr->pool_.get());
  if (!options.init_from.empty()) {
    RETURN_IF_ERROR(LoadWeights(options.init_from, options.model, &tr->model_->params()));
  } else {
    InitParams(options.model, t.seed, &tr->model_->params(), tr->pool_.get());
  }
  tr->exp_avg_ = AllocateParams<float>(options.model);
  tr->exp_avg_sq_ = AllocateParams<float>(options.model);
  if (!options.optimizer_state_from.empty()) {
    RETURN_IF_ERROR(tr->LoadOptimizerState(options.optimizer_state_from));
  }
  tr->inputs_.resize(t.micro_batch_size * t.seq_len);
  tr->targets_.resize(t.micro_batch_size * t.seq_len);
  return tr;
}

absl::StatusOr<StepResult> Trainer::Step() {
  const auto start = std::chrono::steady_clock::now();
  const TrainConfig& t = options_.train;
  const ModelConfig& c = options_.model;
  const int64_t A = t.grad_accum_steps, B = t.micro_batch_size, T = t.seq_len;
  model_->ZeroGrads();
  double loss_sum = 0;
  for (int64_t a = 0; a < A; ++a) {
    RETURN_IF_ERROR(data_->ReadBatch(step_, a, A, B, inputs_.data(), targets_.data()));
    ASSIGN_OR_RETURN(const double loss,
                     model_->ForwardBackward(inputs_.data(), targets_.data(), B, T,
                                             static_cast<float>(1.0 / static_cast<double>(A))));
    if (!std::isfinite(loss)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "step ", step_, ": loss is ", FiniteName(loss), " (micro-batch ", a + 1, " of ", A,
          "); training diverged or the weights hold non-finite values. Parameters and "
          "optimizer state are unchanged; lower optimizer.lr or check init_from"));
    }
    loss_sum += loss;
  }
  auto grads = NamedTensors(c, &model_->grads());
  auto params = NamedTensors(c, &model_->params());
  auto ms = NamedTensors(c, &exp_avg_);
  auto vs = NamedTensors(c, &exp_avg_sq_);
  std::vector<std::pair<float*, int64_t>> gviews;
  for (auto& g : grads) gviews.emplace_back(g.data->data(), static_cast<int64_t>(g.data->size()));
  const double grad_norm = ClipGradNorm(gviews, options_.optimizer.grad_clip);
  RETURN_IF_ERROR(
      CheckGradNormFinite(step_, grad_norm, loss_sum / static_cast<double>(A), grads));
  const double lr = LearningRate(options_.optimizer, step_, t.steps);
  for (size_t i = 0; i < params.size(); ++i) {
    const AdamWHyper h = AdamWHyperFor(options_.optimizer, lr, params[i].shape.size());
    float* p = params[i].data->data();
    const float* g = grads[i].data->data();
    float* m = ms[i].data->data();
    float* v = vs[i].data->data();
    pool_->ParallelFor(static_cast<int64_t>(params[i].data->size()), 1 << 14,
                       [&](int64_t b, int64_t e) {
                         AdamWUpdate(p + b, g + b, m + b, v + b, e - b, h, step_ + 1);
                       });
  }
  StepResult r;
  r.step = step_;
  r.loss = loss_sum / static_cast<double>(A);
  r.lr = lr;
  r.grad_norm = grad_norm;
  r.tokens = A * B * T;
  r.step_time_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++step_;
  return r;
}

absl::Status Trainer::Export(const std::string& dir) const {
  RETURN_IF_ERROR(ExportHfDirectory(dir, options_.model, model_->params()));
  return SaveOptimizerState(dir + "/" + kOptimizerFile, options_.model, exp_avg_, exp_avg_sq_,
                            step_);
}

absl::Status Trainer::LoadOptimizerState(const std::string& path) {
  int64_t step = 0;
  RETURN_IF_ERROR(
      engine::LoadOptimizerState(path, options_.model, &exp_avg_, &exp_avg_sq_, &step));
  step_ = step;
  return absl::OkStatus();
}

}  // namespace lumen::engine
