// Training a model larger than the GPU (DESIGN.md section 2): the device is capped well below
// the training state, and everything streams. The fp32 master weights and AdamW moments live in
// host memory, with pinned bf16 compute copies and fp32 gradients; decoder layers pass through
// two device slots (the next one fetched on the copy stream while the device computes), layer
// inputs are checkpointed to pinned host memory and every layer is recomputed in the backward,
// and AdamW runs on host threads next to the data. The LM head's weight gradient is made in
// blocks of vocabulary rows sent home as they are done, and the embedding's gradient is added
// on the host from the tokens' input gradients: neither fp32 [vocab, hidden] gradient is ever on
// the device.
//
// With clipping (max_grad_norm > 0) each layer's AdamW waits for the step's gradient norm and
// then overlaps the next step's forward, queued in the order the forward needs them (the
// embedding rows of the next step's tokens, layers 0..L-1, norm, head, the other embedding
// rows); or, speculating (CudaOffloadOptions::speculate), it starts during the backward beside
// the current state and is kept or redone once the norm is known. Without clipping, each
// layer's AdamW starts as soon as its gradient is home, overlapping the backward of the layers
// below. Either way the update is the exact synchronous one of CudaTrainer up to bf16
// rounding. The master weights and moments may live in a TensorHome (the memstore's NVMe tier)
// instead of host memory, leaving 6 bytes per parameter there.
// Thread-compatible: one thread drives a CudaOffloadTrainer.
#ifndef LUMEN_WORKER_CUDA_OFFLOAD_TRAINER_H_
#define LUMEN_WORKER_CUDA_OFFLOAD_TRAINER_H_

#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/device.h"
#include "worker/cuda/host_state.h"
#include "worker/cuda/model.h"
#include "worker/cuda/trainer.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {

struct CudaOffloadOptions {
  int64_t batch = 1, seq = 2048, micro_batches = 1;
  // Host threads of the optimizer; 0: every CPU this process may run on.
  int threads = 0;
  // Token rows per logits chunk of the head (its [chunk, vocab] logits are the largest
  // scratch), and vocabulary row blocks of the head's weight gradient.
  int64_t head_chunk_tokens = 512;
  int64_t head_blocks = 32;
  kernels::AttentionKernel attention = kernels::AttentionKernel::kAuto;
  // Where the fp32 master weights and AdamW's moments live: in this process (default), or in
  // a TensorHome such as the memstore, whose NVMe tier holds what host RAM cannot (12 bytes
  // per parameter read and written every step; the embedding's update then runs as one job).
  StateHome state_home;
  // AdamW of each decoder layer, the norm and the untied head starts as soon as its gradients
  // are home even with clipping, written beside the current weights and moments (a second
  // generation: 12 more bytes per parameter of host memory, or of the state home), and is kept
  // once the step's norm needs no clipping, redone with the clipped gradients when it does,
  // dropped when the norm is not finite. Steps without clipping update in place.
  bool speculate = false;
};

struct CudaOffloadStepResult {
  double loss = 0;       // mean token loss over the step's micro-batches
  double grad_norm = 0;  // before clipping
  // Seconds the device computed (timed events around each layer's and the head's kernels,
  // so not the waits for copies or host updates between them).
  double compute_seconds = 0;
  int64_t bytes_home_to_device = 0, bytes_device_to_home = 0;
  // Seconds the host, which issues the device's work, waited for the host AdamW of a decoder
  // layer, and of the embedding, norm or head, during the step.
  double wait_optimizer_layers_s = 0, wait_optimizer_embed_head_s = 0;
  // The decoder layers' AdamW ran during the backward and was kept: no clipping, or
  // speculating and the norm needed none (false: it runs after the norm is known).
  bool optimizer_overlapped = false;
};

class CudaOffloadTrainer {
 public:
  // Device bytes the schedule holds at once (besides the allocator's rounding and cuBLASLt's
  // workspace). INVALID_ARGUMENT for a config CudaLlama refuses.
  static absl::StatusOr<int64_t> WorkingSetBytes(const engine::ModelConfig& config,
                                                 const CudaOffloadOptions& options);
  // Pinned and pageable host bytes the trainer allocates: bf16 parameters, fp32 gradients,
  // and, unless `state_at_home` (options.state_home will name a home), the master weights and
  // moments, a second generation when options.speculate; the step's layer-input checkpoints
  // and embedding rows.
  static int64_t HostBytes(const engine::ModelConfig& config, const CudaOffloadOptions& options,
                           bool state_at_home);
  // The training state as the engine counts it (OffloadRequirements::training_state_bytes):
  // ResidentState::Bytes plus every layer's input and the last layer's output, every
  // micro-batch.
  static int64_t StateBytes(const engine::ModelConfig& config, const CudaOffloadOptions& options);

  // `device` must outlive the trainer. Allocates the device slots and the host state (zero
  // weights: call SetParams or InitRandom). RESOURCE_EXHAUSTED naming the allocation when the
  // working set does not fit the device's budget or pinned memory runs out.
  static absl::StatusOr<std::unique_ptr<CudaOffloadTrainer>> Create(
      CudaDevice* device, const engine::ModelConfig& config, const CudaOffloadOptions& options);
  ~CudaOffloadTrainer();

  // Sets the master weights and their bf16 copies from `params`; zeroes the moments.
  absl::Status SetParams(const engine::ModelParams& params);
  // The same, read a tensor group at a time (a checkpoint, or engine::RandomWeights);
  // without `zero_moments` the caller sets every group's moments next (SetMomentsGroup).
  absl::Status SetParams(engine::WeightsSource& weights, bool zero_moments = true);
  // ResidentState::InitRandom(seed)'s weights, computed on the host.
  absl::Status InitRandom(uint64_t seed);
  // Copies of the master weights / moments (after every update in flight has finished).
  absl::Status GetParams(engine::ModelParams* out);
  absl::Status GetMoments(engine::ModelParams* m, engine::ModelParams* v);
  absl::Status SetMoments(const engine::ModelParams& m, const engine::ModelParams& v);
  // HostTrainingState::GetGroup / SetMomentsGroup, after every update in flight has finished.
  absl::Status GetGroup(int which, size_t g, engine::ModelParams* out);
  absl::Status SetMomentsGroup(size_t g, const engine::ModelParams& m,
                               const engine::ModelParams& v);

  // One optimizer step over inputs/targets of micro_batches * batch * seq ids, micro-batch
  // after micro-batch, as CudaTrainer::Step. `next_inputs` are the next step's inputs (empty
  // when unknown): the embedding rows they need are updated and gathered first. Returns once
  // the loss and gradient norm are known; AdamW may still run (Flush waits for it).
  // INVALID_ARGUMENT for an id outside [0, vocab) or wrong sizes; FAILED_PRECONDITION for a
  // non-finite loss or norm (nothing was updated then, except without clipping and without
  // speculation, where the layers whose AdamW had started are updated).
  absl::StatusOr<CudaOffloadStepResult> Step(const std::vector<int32_t>& inputs,
                                             const std::vector<int32_t>& targets,
                                             const std::vector<int32_t>& next_inputs,
                                             const engine::AdamWHyper& hyper,
                                             double max_grad_norm, int64_t step);

  // Waits for every copy and host update in flight. The first CUDA error, or INTERNAL when a
  // host update was skipped because its gradients never arrived.
  absl::Status Flush();

  const engine::ModelConfig& config() const { return config_; }
  const CudaOffloadOptions& options() const { return options_; }

 private:
  struct HostGroup;
  CudaOffloadTrainer(CudaDevice* device, const engine::ModelConfig& config,
                     const CudaOffloadOptions& options);
  absl::Status Allocate();
  int Threads() const;
  // After new weights: every layer is fetched again and the embedding rows gathered again.
  void ParamsChanged();
  int64_t BlockRows() const;
  size_t EmbedGroup() const { return L_; }
  size_t NormGroup() const { return L_ + 1; }
  size_t HeadGroup() const { return config_.tie_word_embeddings ? L_ : L_ + 2; }
  bf16* Act(int set, int64_t a) const;
  bf16* Ckpt(int64_t l, int64_t a) const;
  void WaitOptimizer(size_t g);
  absl::Status FetchLayer(int64_t l);
  absl::Status FetchBig(size_t g);
  absl::Status CopyHome(void* dst, const void* src, int64_t bytes, Event* saved,
                        const std::string& op);
  // Records that group g's gradients are home once everything copied so far has arrived, and
  // the wait for that a host job makes.
  absl::Status MarkGradsHome(size_t g);
  HostJobQueue::Ready GradsHome(size_t g) const;
  // Queues AdamW on `segments` of group g (all of it when null), gradients multiplied by `coef`;
  // `done` (default: the group's) receives its completion; `after` runs with the queue's
  // threads once it is done.
  void QueueAdamW(size_t g, const engine::AdamWHyper& hyper, int64_t step, float coef,
                  const std::vector<GroupSegment>* segments = nullptr,
                  std::shared_future<void>* done = nullptr,
                  std::function<void(engine::ThreadPool&)> after = nullptr, int from = -1,
                  int to = -1);
  // The embedding's AdamW in two jobs: the rows `next` needs (gathered into embed_in_ once
  // updated; all rows when `next` is empty or the state is in a home), and later the others.
  void QueueEmbeddingRows(const engine::AdamWHyper& hyper, int64_t step, float coef,
                          const std::vector<int32_t>& next);
  void QueueEmbeddingRest(const engine::AdamWHyper& hyper, int64_t step, float coef);
  // Bracket device compute on the compute stream (timed events, for compute_seconds), and
  // their sum once the stream is synchronised.
  absl::Status BeginCompute();
  absl::Status EndCompute();
  absl::StatusOr<double> ComputeSeconds() const;
  // Drops the speculative updates of spec_ (their bf16 copies rewritten from the current
  // weights, refetched by the device) and forgets them.
  void DropSpeculation();

  CudaDevice* const device_;
  const engine::ModelConfig config_;
  const CudaOffloadOptions options_;
  const std::vector<TensorGroupShape> shapes_;
  const int64_t L_, n_, A_;
  std::unique_ptr<CudaLlama> model_;
  DeviceBuffer param_slot_[2], grad_slot_[2], act_[2], xslot_[2];
  DeviceBuffer big_param_, block_grad_[2], lse_, norm_param_, norm_grad_, ids_, loss_sum_,
      norm_acc_;
  std::vector<HostGroup> host_;
  std::unique_ptr<HostTrainingState> state_;
  // On the driving thread: each group's current generation as of the jobs queued so far, and
  // the groups whose update of the running step was queued speculatively.
  std::vector<int> cur_gen_;
  std::vector<size_t> spec_;
  PinnedBuffer ckpt_, embed_dx_, embed_in_, ids_host_;
  // The ids embed_in_ holds the rows of (or is being gathered for); the squared norm of the
  // embedding group's gradient (written by a queued job, read after waiting for it).
  std::vector<int32_t> gathered_for_;
  double embed_sumsq_ = 0;
  std::vector<GroupSegment> embed_rows_, embed_rest_;
  std::shared_future<void> embed_rows_done_, embed_grad_done_;
  Event ev_slot_ready_[2], ev_slot_free_[2], ev_act_saved_[2], ev_grad_saved_[2];
  Event ev_x_ready_[2], ev_x_free_[2];
  Event ev_big_param_ready_, ev_big_param_free_, ev_block_saved_[2], ev_norm_ready_, ev_mark_;
  std::unique_ptr<HostJobQueue> queue_;
  std::vector<std::shared_future<void>> done_;
  int64_t slot_holds_[2] = {-1, -1};
  std::map<int64_t, bool> params_stale_;
  int64_t h2d_ = 0, d2h_ = 0;
  std::vector<Event> timing_;  // start and end of each compute section, pairs
  size_t timing_used_ = 0;     // sections recorded in the running step
  double wait_layers_s_ = 0, wait_big_s_ = 0;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_OFFLOAD_TRAINER_H_
