#include "worker/cuda/offload_trainer.h"

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
#include "common/cpus.h"
#include "common/status_macros.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/kernels.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {

struct CudaOffloadTrainer::HostGroup {
  PinnedBuffer param, grad;  // bf16 compute copy, fp32 gradient (HostTrainingState's buffers)
  Event ready;               // the step's gradients are in `grad`
};

namespace {

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

int64_t CudaOffloadTrainer::HostBytes(const engine::ModelConfig& c, const CudaOffloadOptions& o,
                                      bool state_at_home) {
  int64_t elems = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(c)) elems += s.elems;
  const int64_t n = o.batch * o.seq, A = o.micro_batches, h = c.hidden_size;
  // Pinned bf16 weights and fp32 gradients, the host state's own, checkpoints of every layer's
  // input, the embedding's input gradients and gathered rows, token ids.
  return elems * (2 + 4) + HostTrainingState::OwnBytes(c, state_at_home, o.speculate) +
         2 * c.num_hidden_layers * A * n * h + 2 * (2 * A * n * h) + 8 * A * n;
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
  // Host side: pinned where the copy engines read or write; the master weights and moments
  // (HostTrainingState) only the host optimizer touches.
  engine::ThreadPool init_pool(Threads());
  host_.resize(shapes_.size());
  std::vector<HostGroupBuffers> buffers;
  for (size_t g = 0; g < shapes_.size(); ++g) {
    HostGroup& hg = host_[g];
    const int64_t e = shapes_[g].elems;
    ASSIGN_OR_RETURN(hg.param, dev->AllocatePinned(2 * e, "offload: host parameters"));
    ASSIGN_OR_RETURN(hg.grad, dev->AllocatePinned(4 * e, "offload: host gradients"));
    ASSIGN_OR_RETURN(hg.ready, Event::Create("offload: group event"));
    buffers.push_back({hg.param.as<uint16_t>(), hg.grad.as<float>()});
  }
  ASSIGN_OR_RETURN(state_, HostTrainingState::Create(config_, std::move(buffers),
                                                     options_.state_home, init_pool,
                                                     options_.speculate));
  cur_gen_.assign(shapes_.size(), 0);
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
  const int device = dev->device_index();
  queue_ = std::make_unique<HostJobQueue>(Threads(), [device] { cudaSetDevice(device); });
  done_.resize(shapes_.size());
  return absl::OkStatus();
}

int CudaOffloadTrainer::Threads() const {
  return options_.threads > 0 ? options_.threads : UsableCpus();
}

void CudaOffloadTrainer::ParamsChanged() {
  for (int64_t l = 0; l < L_; ++l) params_stale_[l] = true;
  gathered_for_.clear();
}

absl::Status CudaOffloadTrainer::SetParams(const engine::ModelParams& params) {
  RETURN_IF_ERROR(Flush());
  engine::ThreadPool pool(Threads());
  ParamsChanged();
  return state_->SetParams(params, pool);
}

absl::Status CudaOffloadTrainer::SetParams(engine::WeightsSource& weights, bool zero_moments) {
  RETURN_IF_ERROR(Flush());
  engine::ThreadPool pool(Threads());
  ParamsChanged();
  return state_->SetParams(weights, pool, zero_moments);
}

absl::Status CudaOffloadTrainer::InitRandom(uint64_t seed) {
  RETURN_IF_ERROR(Flush());
  engine::ThreadPool pool(Threads());
  ParamsChanged();
  return state_->InitRandom(seed, pool);
}

absl::Status CudaOffloadTrainer::GetParams(engine::ModelParams* out) {
  RETURN_IF_ERROR(Flush());
  return state_->GetParams(out);
}

absl::Status CudaOffloadTrainer::GetMoments(engine::ModelParams* m, engine::ModelParams* v) {
  RETURN_IF_ERROR(Flush());
  return state_->GetMoments(m, v);
}

absl::Status CudaOffloadTrainer::SetMoments(const engine::ModelParams& m,
                                            const engine::ModelParams& v) {
  RETURN_IF_ERROR(Flush());
  return state_->SetMoments(m, v);
}

absl::Status CudaOffloadTrainer::GetGroup(int which, size_t g, engine::ModelParams* out) {
  RETURN_IF_ERROR(Flush());
  return state_->GetGroup(which, g, out);
}

absl::Status CudaOffloadTrainer::SetMomentsGroup(size_t g, const engine::ModelParams& m,
                                                 const engine::ModelParams& v) {
  RETURN_IF_ERROR(Flush());
  return state_->SetMomentsGroup(g, m, v);
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

// The job synchronises on the group's event as recorded when the job runs, not when it was
// queued. That is the right record because every re-record of host_[g].ready (MarkGradsHome)
// comes after the host waited for the group's last queued job (WaitOptimizer in the fetches,
// or before the embedding's input gradients go home): keep it so when adding a path that
// records it.
HostJobQueue::Ready CudaOffloadTrainer::GradsHome(size_t g) const {
  cudaEvent_t ev = host_[g].ready.get();
  return [ev, g]() -> absl::Status {
    const cudaError_t e = cudaEventSynchronize(ev);
    if (e == cudaSuccess) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("waiting for the gradients of tensor group ", g,
                                            ": ", cudaGetErrorName(e), ": ",
                                            cudaGetErrorString(e)));
  };
}

void CudaOffloadTrainer::QueueAdamW(size_t g, const engine::AdamWHyper& hyper, int64_t step,
                                    float coef, const std::vector<GroupSegment>* segments,
                                    std::shared_future<void>* done,
                                    std::function<void(engine::ThreadPool&)> after, int from,
                                    int to) {
  // A copy: the step's row segments are rebuilt by the next step while this may still wait.
  std::shared_ptr<const std::vector<GroupSegment>> segs;
  if (segments != nullptr) segs = std::make_shared<const std::vector<GroupSegment>>(*segments);
  HostTrainingState* state = state_.get();
  auto work = [state, g, segs, hyper, step, coef, after, from, to](engine::ThreadPool& pool) {
    RETURN_IF_ERROR(state->AdamW(g, segs.get(), hyper, step, coef, pool, from, to));
    if (after) after(pool);
    return absl::OkStatus();
  };
  *(done != nullptr ? done : &done_[g]) = queue_->Submit(GradsHome(g), std::move(work));
  if (static_cast<int64_t>(g) < L_) params_stale_[g] = true;
}

void CudaOffloadTrainer::QueueEmbeddingRows(const engine::AdamWHyper& hyper, int64_t step,
                                            float coef, const std::vector<int32_t>& next) {
  const size_t embed = EmbedGroup();
  embed_rows_.clear();
  embed_rest_.clear();
  // The next step's rows are unknown, or the moments live in a home (each update streams all
  // of the group's moment chunks): the whole table, gathered by the next step.
  if (next.empty() || state_->state_at_home()) {
    gathered_for_.clear();
    QueueAdamW(embed, hyper, step, coef);
    return;
  }
  HostTrainingState::SplitEmbeddingRows(next, config_.vocab_size, config_.hidden_size,
                                        &embed_rows_, &embed_rest_);
  gathered_for_ = next;
  auto ids = std::make_shared<const std::vector<int32_t>>(next);
  HostTrainingState* state = state_.get();
  uint16_t* out = embed_in_.as<uint16_t>();
  QueueAdamW(embed, hyper, step, coef, &embed_rows_, &embed_rows_done_,
             [state, ids, out](engine::ThreadPool& pool) {
               state->GatherEmbeddingRows(*ids, out, &pool);
             });
  done_[embed] = embed_rows_done_;
}

void CudaOffloadTrainer::QueueEmbeddingRest(const engine::AdamWHyper& hyper, int64_t step,
                                            float coef) {
  if (!embed_rest_.empty()) QueueAdamW(EmbedGroup(), hyper, step, coef, &embed_rest_);
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
  // AdamW starts as each group's gradients arrive: in place without clipping (nothing to wait
  // for), or beside the current values when speculating (kept, redone or dropped once the norm
  // is known).
  const bool speculate = options_.speculate && max_grad_norm > 0;
  const bool early = speculate || max_grad_norm <= 0;
  // A step that failed after speculating left those groups' bf16 copies holding its updates.
  DropSpeculation();
  auto queue_early = [&](size_t g) {
    if (!early) return;
    if (!speculate) {
      QueueAdamW(g, hyper, step, 1.0f);
      return;
    }
    QueueAdamW(g, hyper, step, 1.0f, nullptr, nullptr, nullptr, cur_gen_[g], 1 - cur_gen_[g]);
    spec_.push_back(g);
  };
  h2d_ = d2h_ = 0;
  wait_layers_s_ = wait_big_s_ = 0;
  timing_used_ = 0;
  cudaStream_t cs = device_->compute_stream(), h2d = device_->h2d_stream();
  // The pinned staging may still feed the upload of a step that failed after queuing it, and
  // that step's embedding-gradient job may still be queued.
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cs), "offload step: wait for the previous step");
  if (embed_grad_done_.valid()) embed_grad_done_.wait();
  // A host update that failed (the moments' home, a CUDA error) ends the job here, not at the
  // next checkpoint.
  RETURN_IF_ERROR(queue_->error());
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
    state_->GatherEmbeddingRows(inputs, embed_in_.as<uint16_t>(), nullptr);
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
    RETURN_IF_ERROR(BeginCompute());
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(
          model_->DecoderLayerForward(static_cast<int>(l), Act(cur, a), Act(1 - cur, a), B, T));
    }
    RETURN_IF_ERROR(EndCompute());
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
  RETURN_IF_ERROR(BeginCompute());
  for (int64_t a = 0; a < A_; ++a) {
    RETURN_IF_ERROR(model_->HeadForwardBackwardNoWeightGrad(
        Act(cur, a), tg + a * n_, B, T, micro_scale, Act(1 - cur, a), loss_sum_.as<double>(),
        Act(cur, a), lse + a * n_));
  }
  RETURN_IF_ERROR(EndCompute());
  // The head's weight gradient, a block of vocabulary rows at a time, each sent home into the
  // group's host gradient while the next is made.
  const size_t head = HeadGroup();
  const int64_t V = config_.vocab_size, vb = BlockRows();
  for (int64_t j = 0, v0 = 0; v0 < V; ++j, v0 += vb) {
    const int64_t rows = std::min(vb, V - v0);
    const int k = static_cast<int>(j % 2);
    RETURN_IF_ERROR(ev_block_saved_[k].StreamWait(cs, "offload: head gradient"));
    RETURN_IF_ERROR(BeginCompute());
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(block_grad_[k].get(), 0, 4 * rows * h, cs),
                         "offload: head gradient");
    for (int64_t a = 0; a < A_; ++a) {
      RETURN_IF_ERROR(model_->HeadWeightGradRows(Act(cur, a), tg + a * n_, lse + a * n_, B, T,
                                                 micro_scale, big_param_.as<bf16>() + v0 * h, v0,
                                                 rows, block_grad_[k].as<float>()));
    }
    RETURN_IF_ERROR(EndCompute());
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
    queue_early(head);
  }
  RETURN_IF_ERROR(kernels::SumSquares(norm_grad_.as<float>(), h, norm_acc, cs));
  RETURN_IF_ERROR(CopyHome(host_[NormGroup()].grad.get(), norm_grad_.get(), 4 * h, nullptr,
                           "offload: norm gradient"));
  RETURN_IF_ERROR(MarkGradsHome(NormGroup()));
  queue_early(NormGroup());
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
      RETURN_IF_ERROR(BeginCompute());
      RETURN_IF_ERROR(model_->DecoderLayerBackward(static_cast<int>(l), xslot_[x].as<bf16>(),
                                                   Act(dcur, a), Act(1 - dcur, a), B, T));
      RETURN_IF_ERROR(EndCompute());
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
    if (l > 0) queue_early(l);
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
  HostTrainingState* state = state_.get();
  const uint16_t* dx = embed_dx_.as<uint16_t>();
  embed_grad_done_ = queue_->Submit(
      GradsHome(embed),
      [this, state, ids, dx](engine::ThreadPool& pool) {
        embed_sumsq_ = state->AddEmbeddingGradient(*ids, dx, pool);
        return absl::OkStatus();
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
  ASSIGN_OR_RETURN(const double compute_seconds, ComputeSeconds());
  {
    const auto t0 = std::chrono::steady_clock::now();
    embed_grad_done_.wait();
    wait_big_s_ += Seconds(t0);
  }
  RETURN_IF_ERROR(queue_->error());
  CudaOffloadStepResult r;
  r.loss = loss_sum / static_cast<double>(total);
  r.grad_norm = std::sqrt(device_sumsq + embed_sumsq_);
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
    gathered_for_.clear();
    DropSpeculation();
    const bool applied = early && !speculate;
    return absl::FailedPreconditionError(absl::StrCat(
        "loss ", r.loss, ", gradient norm ", r.grad_norm, " (update ", step,
        applied ? " applied to the layers whose AdamW had started: the weights held now are "
                  "not to be kept)"
                : " not applied: parameters and moments unchanged)"));
  }
  float coef = 1.0f;
  if (max_grad_norm > 0) {
    const double c = max_grad_norm / (r.grad_norm + 1e-6);
    if (c < 1.0) coef = static_cast<float>(c);
  }
  // The updates the next step's forward needs first come first: the embedding rows of its
  // tokens, then layer 0, 1, ..., the norm and head. Queued early, the other layers, the norm
  // and the head only remain to be kept (speculative, redone first when clipped).
  QueueEmbeddingRows(hyper, step, coef, next_inputs);
  QueueAdamW(0, hyper, step, coef);
  if (!early) {
    for (int64_t l = 1; l < L_; ++l) QueueAdamW(l, hyper, step, coef);
    QueueAdamW(NormGroup(), hyper, step, coef);
    if (!tied) QueueAdamW(head, hyper, step, coef);
  } else if (speculate) {
    std::vector<size_t> order = spec_;
    std::sort(order.begin(), order.end());  // layers ascending, then the norm and the head
    HostTrainingState* state = state_.get();
    for (size_t g : order) {
      const int next = 1 - cur_gen_[g];
      if (coef < 1.0f) {
        QueueAdamW(g, hyper, step, coef, nullptr, nullptr, nullptr, cur_gen_[g], next);
      }
      done_[g] = queue_->Submit(nullptr, [state, g, next](engine::ThreadPool&) {
        state->SetCurrent(g, next);
        return absl::OkStatus();
      });
      cur_gen_[g] = next;
    }
    spec_.clear();
  }
  QueueEmbeddingRest(hyper, step, coef);
  r.compute_seconds = compute_seconds;
  r.bytes_home_to_device = h2d_;
  r.bytes_device_to_home = d2h_;
  r.wait_optimizer_layers_s = wait_layers_s_;
  r.wait_optimizer_embed_head_s = wait_big_s_;
  r.optimizer_overlapped = early && coef == 1.0f;
  return r;
}

absl::Status CudaOffloadTrainer::BeginCompute() {
  while (timing_.size() < 2 * (timing_used_ + 1)) {
    ASSIGN_OR_RETURN(Event e, Event::CreateTimed("offload: compute timing"));
    timing_.push_back(std::move(e));
  }
  return timing_[2 * timing_used_].Record(device_->compute_stream(), "offload: compute timing");
}

absl::Status CudaOffloadTrainer::EndCompute() {
  RETURN_IF_ERROR(
      timing_[2 * timing_used_ + 1].Record(device_->compute_stream(), "offload: compute timing"));
  ++timing_used_;
  return absl::OkStatus();
}

absl::StatusOr<double> CudaOffloadTrainer::ComputeSeconds() const {
  double total = 0;
  for (size_t i = 0; i < timing_used_; ++i) {
    ASSIGN_OR_RETURN(const double s, Event::ElapsedSeconds(timing_[2 * i], timing_[2 * i + 1],
                                                           "offload: compute timing"));
    total += s;
  }
  return total;
}

void CudaOffloadTrainer::DropSpeculation() {
  HostTrainingState* state = state_.get();
  for (size_t g : spec_) {
    done_[g] = queue_->Submit(nullptr, [state, g](engine::ThreadPool& pool) {
      return state->RewriteBf16(g, pool);
    });
    if (static_cast<int64_t>(g) < L_) params_stale_[g] = true;
  }
  spec_.clear();
}

absl::Status CudaOffloadTrainer::Flush() {
  if (device_ == nullptr) return absl::OkStatus();
  absl::Status s = device_->SynchronizeAll("offload: finish");
  for (auto& f : done_) {
    if (f.valid()) f.wait();
  }
  if (embed_rows_done_.valid()) embed_rows_done_.wait();
  if (embed_grad_done_.valid()) embed_grad_done_.wait();
  if (s.ok() && queue_ != nullptr) s = queue_->error();
  return s;
}

}  // namespace lumen::cuda
