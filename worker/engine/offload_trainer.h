// Trains a model whose training state (parameters, gradients, AdamW moments,
// activation checkpoints) is larger than the device memory budget: everything
// lives in a TensorHome and moves to the device layer by layer, with layer-wise
// batching (DESIGN.md §2). Same options, data order and numerics contract as
// Trainer. Thread-compatible: one thread drives an OffloadTrainer; it uses
// num_threads threads internally. DeviceMemory is thread-safe.
#ifndef LUMEN_WORKER_ENGINE_OFFLOAD_TRAINER_H_
#define LUMEN_WORKER_ENGINE_OFFLOAD_TRAINER_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/engine/collective.h"
#include "worker/engine/data.h"
#include "worker/engine/model.h"
#include "worker/engine/tensor_home.h"
#include "worker/engine/thread_pool.h"
#include "worker/engine/transfers.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {

// "1.50 MiB (1572864 bytes)".
std::string FormatBytes(int64_t bytes);

// Accounts for every byte that is "on the device" against a fixed budget.
// Allocate never exceeds the budget: it fails with RESOURCE_EXHAUSTED naming
// the op and the numbers. Thread-safe; an Allocation may be released from any
// thread but must not outlive its DeviceMemory.
class DeviceMemory {
 public:
  // A reservation of bytes; released when destroyed or Release()d. Movable, not
  // copyable.
  class Allocation {
   public:
    Allocation() = default;
    Allocation(Allocation &&other) noexcept { *this = std::move(other); }
    Allocation &operator=(Allocation &&other) noexcept;
    Allocation(const Allocation &) = delete;
    Allocation &operator=(const Allocation &) = delete;
    ~Allocation() { Release(); }
    void Release();
    int64_t bytes() const { return bytes_; }

   private:
    friend class DeviceMemory;
    DeviceMemory *owner_ = nullptr;
    int64_t bytes_ = 0;
  };

  explicit DeviceMemory(int64_t budget_bytes) : budget_(budget_bytes) {}

  // Reserves `bytes` for `op` (e.g. "forward of layer 3: parameters").
  // RESOURCE_EXHAUSTED "forward of layer 3: parameters needs 1.20 MiB (...)
  // more; device budget 4.00 MiB (...), in use 3.50 MiB (...)" when in_use +
  // bytes > budget; nothing is reserved then.
  absl::StatusOr<Allocation> Allocate(int64_t bytes, const std::string &op);

  int64_t budget() const { return budget_; }
  int64_t in_use() const;
  int64_t peak() const;
  // Sets the peak to the bytes in use now.
  void ResetPeak();

 private:
  void Free(int64_t bytes);

  const int64_t budget_;
  mutable absl::Mutex mu_;
  int64_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t peak_ ABSL_GUARDED_BY(mu_) = 0;
};

// The parameter reads of the coordinator's step schedule, as this trainer runs them (DESIGN.md
// §2: the planner decides how far ahead parameters load). The trainer's compute ops are
// numbered in the order it runs them: 0 the embedding's forward, 1..L the decoder layers'
// forwards, L + 1 the head (forward and backward), L + 2..2L + 1 the decoder layers'
// backwards from the top, 2L + 2 the embedding's backward. Layers are numbered as the planner
// numbers them: 0 the embedding, 1..L the decoder layers, L + 1 the head.
struct ParameterSchedule {
  // at_op[k]: layers whose parameters are read from the home when compute op k starts (before
  // it reads its own). Empty: no schedule. Otherwise 2L + 3 entries.
  std::vector<std::vector<int>> at_op;
};

struct OffloadOptions {
  // Device memory the trainer may use at once (parameters and gradients of the
  // layer being run, one micro-batch's activation scratch including logits,
  // resident checkpoints, optimizer working tensors, token ids). When the whole
  // training state fits with room for the largest op, everything stays resident
  // and the home is not used; otherwise tensors stream through the home and
  // checkpoints use whatever the largest op leaves free.
  int64_t device_budget_bytes = int64_t{1} << 30;
  // The home tier of each tensor class. Optimizer state (AdamW m and v) is the
  // usual candidate for NVMe: read and written once per step, by the optimizer
  // only.
  HomeTier parameters_tier = HomeTier::kHost;
  HomeTier gradients_tier = HomeTier::kHost;
  HomeTier optimizer_state_tier = HomeTier::kHost;
  HomeTier activations_tier = HomeTier::kHost;
  // Where tensors live off the device; not owned, must outlive the trainer. May
  // be null only when everything fits on the device.
  TensorHome *home = nullptr;
  // The same tensors as the host CPU reaches them without crossing the device
  // link (the home under a link model); the host-side optimizer uses it. Null:
  // `home`.
  TensorHome *host_home = nullptr;
  // From the second step on, reads of the home are issued ahead of use, in the
  // order the first step made them (its trace), as far as the prefetch memory
  // allows, and run while the device computes; writes home always run behind
  // compute. False: every read waits at the op that needs it (on demand).
  bool prefetch = true;
  // AdamW runs on the host next to the data (host_home), so optimizer state
  // never crosses the link: during the backward (overlap_optimizer), or once the
  // step's gradient norm is known, overlapping the next step's forward. False:
  // on the device, tensor by tensor. Ignored when everything is resident.
  bool host_optimizer = true;
  // With host_optimizer: each tensor's AdamW starts as soon as its gradient is
  // complete, overlapping the backward of the layers below (DESIGN.md §2), on
  // the assumption that the step's gradient norm will need no clipping; the
  // results are written beside the current tensors in the home and kept (by
  // aliasing, not copying) once the norm is known. When the norm turns out
  // non-finite they are dropped; when it needs clipping they are dropped and
  // the clipped update runs as without this option, and the next step waits for
  // the norm again until a step needs no clipping. The results are identical to
  // the synchronous update either way. Costs the home one more copy of the
  // parameters and moments from the first overlapped step on (both generations
  // stay stored; OffloadRequirements::overlap_bytes).
  // Off by default: on the CPU device the backward's cores are the optimizer's
  // (lumend --optimizer-overlap).
  bool overlap_optimizer = false;
  // With prefetch: parameter reads issued where the coordinator's schedule issues them, in
  // steps the trainer has no trace of yet (its first); later steps read ahead in the order
  // their first step read, as early as memory allows.
  ParameterSchedule schedule;
  // Data parallelism (collective.h): this trainer is one replica of a job on several workers.
  // A replica whose whole training state fits the device keeps it there and sums the device's
  // gradients with the others'. Otherwise the replicas share one copy of the parameters and
  // AdamW moments in `home` (every replica must be given the same home and host home, e.g. the
  // memstore under the job's prefix; replica 0 places the initial state): each keeps its
  // gradients and activation checkpoints there under OffloadTrainer::ReplicaPrefix(rank).
  // After the backward every tensor's gradients are summed by the replica that owns it (the
  // tensors are split among the replicas by size, in order), which then runs that tensor's
  // AdamW on the host; a step ends when every replica's updates are written, so the next
  // forward reads the new parameters. Offloaded replicas always update on the host and never
  // overlap the backward (host_optimizer, overlap_optimizer are ignored).
  ReplicaOptions replica;
};

// One op of a traced step: a compute op ("forward of layer 3, mb 0") or a wait ("wait for
// read: param/model.layers.4.mlp.up_proj.weight"), seconds from the step's start.
struct TraceEvent {
  std::string name;
  const char *category;  // "compute" or "wait"
  double start_s;
  double duration_s;
};

// StepResult plus what the step did with device memory and the home.
struct OffloadStepResult : StepResult {
  int64_t device_memory_budget_bytes = 0;
  // Most bytes allocated on the device at once during the step (<= the budget).
  int64_t device_memory_peak_bytes = 0;
  int64_t bytes_home_to_device = 0;
  int64_t bytes_device_to_home = 0;
  int64_t bytes_moved() const { return bytes_home_to_device + bytes_device_to_home; }
  // Seconds the device computed, and seconds it stood waiting: for a read from
  // the home (a prefetch that was late, or an on-demand read), for the host
  // optimizer to finish a tensor it needed, for writes home to free memory.
  double compute_seconds = 0;
  double stall_transfer_seconds = 0;
  double stall_optimizer_seconds = 0;
  double stall_memory_seconds = 0;
  // Tensors read from the home, how many of those reads were issued ahead of
  // need (prefetches), and how many had finished before the device asked.
  int64_t home_reads = 0;
  int64_t prefetched_reads = 0;
  int64_t prefetch_hits = 0;
  // AdamW started during the backward (OffloadOptions::overlap_optimizer), and
  // whether those results were kept (false: the norm needed clipping or was
  // non-finite, and they were thrown away).
  bool optimizer_overlapped = false;
  bool optimizer_overlap_kept = false;
  double device_busy_fraction() const {
    return step_time_s > 0 ? std::min(1.0, compute_seconds / step_time_s) : 0;
  }
  double prefetch_hit_rate() const {
    return home_reads > 0 ? static_cast<double>(prefetch_hits) / home_reads : 1.0;
  }
  double read_ahead_fraction() const {
    return home_reads > 0 ? static_cast<double>(prefetched_reads) / home_reads : 1.0;
  }
};

// What a job needs, from its shape alone (no data, no weights).
struct OffloadRequirements {
  // The largest working set of one op: the least device budget that can run a step.
  int64_t largest_op_bytes = 0;
  std::string largest_op;  // "backward of layer 15"
  // fp32 parameters (gradients and each AdamW moment are as large).
  int64_t parameter_bytes = 0;
  // Activation checkpoints of one step (every layer's input and the last
  // layer's output, every micro-batch).
  int64_t activation_bytes = 0;
  int64_t training_state_bytes() const { return 4 * parameter_bytes + activation_bytes; }
  // Device memory to keep everything resident: the state and room for the largest op.
  int64_t resident_bytes() const { return training_state_bytes() + largest_op_bytes; }
  // Home bytes beyond the training state when the optimizer overlaps the
  // backward: a second generation of the parameters and moments.
  int64_t overlap_bytes() const { return 3 * parameter_bytes; }
};

class OffloadTrainer {
 public:
  // INVALID_ARGUMENT for a bad config (as Trainer::Create).
  static absl::StatusOr<OffloadRequirements> Requirements(const TrainerOptions &options);

  // INVALID_ARGUMENT for a bad config (as Trainer::Create) or a null home when
  // the state does not fit the budget; data/init_from errors as
  // Trainer::Create; errors of the home. Initialises exactly as Trainer
  // (InitParams or LoadWeights), then moves everything home.
  static absl::StatusOr<std::unique_ptr<OffloadTrainer>> Create(const TrainerOptions &options,
                                                                const OffloadOptions &offload);
  ~OffloadTrainer();

  // One optimizer step: forward layer by layer over all micro-batches, head,
  // backward layer by layer in reverse with recompute, global-norm clipping,
  // AdamW per tensor. Losses and weights are bit-identical whatever the budget.
  // Errors as Trainer::Step, plus RESOURCE_EXHAUSTED (before any work) when one
  // op's working set exceeds the budget, naming the op and the bytes, and
  // errors of the home. Errors before the optimizer phase leave parameters,
  // optimizer state and the step counter unchanged; an error of the home during
  // the optimizer phase may leave them partly updated.
  absl::StatusOr<OffloadStepResult> Step();

  // Waits until every transfer and host-side optimizer update in flight has
  // finished; the first error any of them had.
  absl::Status Flush();

  // Writes the same directory as Trainer::Export (config.json, weights,
  // optimizer.safetensors), reading the tensors from wherever they live.
  absl::Status Export(const std::string &dir);

  // Copies of the current parameters / AdamW moments, gathered from the device
  // and the home.
  absl::StatusOr<ModelParams> GatherParams();
  absl::Status GatherOptimizerState(ModelParams *exp_avg, ModelParams *exp_avg_sq);

  // Bytes of parameters + gradients + m + v (fp32) + activation checkpoints
  // (every layer's input and the last layer's output, for every micro-batch of
  // a step).
  int64_t TrainingStateBytes() const;
  // The largest working set of one op (the least budget that can run a step),
  // and its name.
  int64_t MinDeviceBytes() const;
  std::string LargestOp() const;
  // True when everything stays on the device (no home traffic).
  bool resident() const { return resident_; }
  // Where replica `rank` of a job on several workers keeps its own tensors in a shared home
  // ("r1/"): gradients and activation checkpoints, under their usual ids after it.
  static std::string ReplicaPrefix(int rank);
  // Activation checkpoints that may stay on the device (the rest go home).
  int64_t max_resident_activations() const { return max_resident_acts_; }

  // The trainer's first successful step as it ran: every compute op and every wait, in order
  // (empty before it). Later steps prefetch what this step waited for.
  const std::vector<TraceEvent> &first_step_trace() const { return trace_events_; }

  int64_t step() const { return step_; }
  const TrainerOptions &options() const { return options_; }
  const DeviceMemory &device_memory() const { return mem_; }

 private:
  // A float buffer on the device. `resident`: it lives on the device between
  // uses (its home copy, if any, is stale), so it returns to the device map
  // after use.
  struct DeviceBuffer {
    std::vector<float> data;
    DeviceMemory::Allocation alloc;
    bool resident = false;
  };
  class Binding;
  struct OpSize {
    std::string op;
    int64_t bytes;
  };
  // One read of the first step: tensor, floats, and how many times the step
  // had written it before.
  struct TraceEntry {
    std::string id;
    int64_t n;
    int64_t version;
  };
  struct Prefetch {
    DeviceBuffer buf;
    std::shared_ptr<const Transfers::Ticket> ticket;
  };

  OffloadTrainer(const TrainerOptions &options, const OffloadOptions &offload);
  absl::Status Init();
  std::vector<OpSize> OpWorkingSets() const;
  static std::vector<OpSize> WorkingSets(const TrainerOptions &options, const LlamaModel &model,
                                         const std::vector<NamedTensor<float>> &param_slots);

  // Reserves device memory for the op, waiting for writes home to free some
  // when the budget is full.
  absl::StatusOr<DeviceMemory::Allocation> Allocate(int64_t bytes, const std::string &op);
  absl::StatusOr<DeviceBuffer> NewBuffer(int64_t n, bool resident, const std::string &op);
  // Issues reads of the traced tensors that come next, while the prefetch
  // window has room.
  void IssuePrefetches();
  // Issues the schedule's parameter reads due when compute op `op` starts
  // (ParameterSchedule), while the trainer has no trace.
  void IssueScheduled(int op);
  // Waits for and drops a prefetch of `id` (or all of them).
  void DropPrefetch(const std::string &id);
  void DropPrefetches();
  // Queues `buf` to be written home (its memory is released once written).
  void WriteHome(const std::string &id, DeviceBuffer buf, HomeTier tier);
  void FreeHome(const std::string &id);
  int64_t StepVersion(const std::string &id) const;
  // Where the running step's trace events go; null when the step is not traced.
  std::vector<TraceEvent> *Tracing() { return tracing_ ? &trace_events_ : nullptr; }
  // Adds the squared norm of a complete gradient (tensor index i).
  void GradDone(int i, const DeviceBuffer &g);
  // Data parallel: replaces the device's gradients and `loss_sum` by the replicas' sums and
  // recomputes each gradient's square sum.
  absl::Status SumAcrossReplicas(double *loss_sum);
  // Data parallel with the state shared in the home: once every replica's gradients are home,
  // sums the gradients of the tensors this replica owns (stored as its own), and leaves in
  // grad_sq_ every tensor's square sum and in `loss_sum` the replicas' sum.
  absl::Status ReduceSharedGradients(double *loss_sum);
  // The replicas' collective call `phase` (0 to 3) of step step_: sums `scalars` (may be
  // empty), and returns only when every replica has made it.
  absl::Status ReplicaBarrier(int phase, std::vector<double> *scalars);
  // Whether this trainer updates tensor i: always, except a replica sharing its state.
  bool Owns(int i) const {
    return !shared_state_ || owner_[i] == offload_.replica.collective->rank();
  }
  // Queues tensor i's AdamW on the host thread, once its gradient is
  // home: reads the parameters and moments of generation `from`, scales the
  // gradient by `coef` when `clip`, writes generation `to`.
  void HostAdamW(int i, double lr, bool clip, float coef, int from, int to);
  // With overlap_: tensor i's AdamW with an unclipped gradient, written beside its
  // current parameters and moments (the other Generation).
  void OverlapUpdate(int i);
  // After the norm is known: keeps the overlapped updates (ids point at them)
  // or ignores them (the next overlapped update overwrites them).
  void FinishOverlap(bool keep);
  // The stored name of tensor `id` in generation 0 or 1.
  static std::string Generation(const std::string &id, int generation);
  absl::Status HostOptimizer(double lr, bool clip, float coef);
  absl::Status DeviceOptimizer(double lr, bool clip, float coef);
  // Takes tensor `id` from the device map, or reads it from the home into a new
  // buffer.
  absl::StatusOr<DeviceBuffer> Fetch(const std::string &id, int64_t n, const std::string &op);
  // As Fetch, but zero-filled and never read from the home.
  absl::StatusOr<DeviceBuffer> FetchZeroed(const std::string &id, int64_t n, bool resident,
                                           const std::string &op);
  // After use: resident buffers go back to the device map; others are written
  // home when `dirty` and dropped.
  absl::Status Return(const std::string &id, DeviceBuffer buf, HomeTier tier, bool dirty);
  // A new activation: kept on the device while a checkpoint slot is free or can
  // be freed by evicting a checkpoint (EvictActivation), else sent home.
  absl::Status StoreActivation(const std::string &id, DeviceBuffer buf);
  // Sends home the resident checkpoint used farthest in the future among those
  // before evict_before_ (layer, micro-batch); false when there is none.
  bool EvictActivation();
  // An activation used for the last time.
  absl::Status DropActivation(const std::string &id, DeviceBuffer buf);
  void DropResidentActivations();
  int64_t ResidentActivations() const;
  absl::Status GatherClass(const std::string &prefix, ModelParams *out);
  absl::StatusOr<OffloadStepResult> RunStep();

  // Constant after construction.
  const TrainerOptions options_;
  const OffloadOptions offload_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<TokenDataset> data_;
  // The model's parameter / gradient vectors, NamedTensors order; empty between
  // uses.
  std::vector<NamedTensor<float>> param_slots_, grad_slots_;
  bool resident_ = false;
  // A data-parallel replica whose state is shared in the home (OffloadOptions::replica), the
  // replica that owns each tensor, and the homes with this replica's own tensors renamed.
  bool shared_state_ = false;
  std::vector<int> owner_;
  std::unique_ptr<RenamedTensorHome> replica_home_, replica_host_home_;
  int64_t max_resident_acts_ = 0;

  int64_t prefetch_window_ = 0;  // device bytes prefetched reads may hold

  DeviceMemory mem_;
  std::map<std::string, DeviceBuffer> device_;  // tensors resident between uses
  std::vector<int32_t> inputs_, targets_;       // all micro-batches of a step
  int64_t bytes_in_ = 0, bytes_out_ = 0;        // this step's home traffic
  OffloadStepResult stats_;                     // this step's times and counts
  std::vector<double> grad_sq_;                 // per tensor, this step
  // Overlapped optimizer: the stored generation of each tensor's parameters and
  // moments; whether this step overlaps and its learning rate; the tensors
  // updated so far; whether the last step clipped.
  std::vector<int> generation_;
  bool overlap_ = false;
  double overlap_lr_ = 0;
  std::vector<int> overlapped_;
  bool last_step_clipped_ = false;
  int64_t step_ = 0;
  // Checkpoints of (layer, micro-batch) before this are not needed again until
  // the backward, so they may be evicted.
  std::pair<int64_t, int64_t> evict_before_{0, 0};
  // The first step's trace (TraceEvent).
  bool tracing_ = false, first_step_traced_ = false;
  std::vector<TraceEvent> trace_events_;
  std::chrono::steady_clock::time_point step_start_;

  // Prefetching. The trace of the first step, the position of the step being
  // run in it and the next entry to prefetch; reads in flight; writes home per
  // id in this step; ids that exist at home.
  std::vector<TraceEntry> trace_;
  bool recording_ = false, traced_ = false;
  size_t cursor_ = 0, issue_cursor_ = 0;
  std::map<std::string, Prefetch> prefetched_;
  int64_t prefetched_bytes_ = 0;
  std::map<std::string, int64_t> step_writes_;
  std::set<std::string> at_home_;
  // The home with ids resolved through aliases_ (the current generation of each
  // tensor). Host jobs see offload_.host_home (or the home) without aliases and
  // name stored generations themselves.
  AliasTable aliases_;
  std::unique_ptr<AliasedTensorHome> home_;
  // Declared last: destroyed first, while mem_ still accounts its buffers.
  std::unique_ptr<Transfers> transfers_;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_OFFLOAD_TRAINER_H_
