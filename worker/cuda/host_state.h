// The host side of the streamed CUDA trainer (offload_trainer.h), without CUDA, so it builds
// and is tested on every machine: the fp32 master weights and AdamW moments of each tensor
// group (layout.h), the updates that write the bf16 compute copies the device fetches, the
// embedding's gradient made from the tokens' input gradients, and the queue that runs these
// jobs in order on host threads.
#ifndef LUMEN_WORKER_CUDA_HOST_STATE_H_
#define LUMEN_WORKER_CUDA_HOST_STATE_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/layout.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/tensor_home.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {

// Runs jobs in submission order on one thread that splits each over a ThreadPool. A job first
// waits for what it reads (`ready`); when that fails the job's work is skipped. error() keeps
// the first failure of either. Thread-safe.
class HostJobQueue {
 public:
  using Work = std::function<absl::Status(engine::ThreadPool&)>;
  using Ready = std::function<absl::Status()>;
  // `on_start` runs first on the queue's thread (e.g. to make a CUDA device current).
  explicit HostJobQueue(int threads, std::function<void()> on_start = nullptr);
  // Runs every job already queued, then stops.
  ~HostJobQueue();
  // `ready` may be null; `front`: ahead of every job not yet started.
  std::shared_future<void> Submit(Ready ready, Work work, bool front = false);
  absl::Status error();

 private:
  struct Job {
    Ready ready;
    Work work;
    std::promise<void> done;
  };
  void Loop(std::function<void()> on_start);

  engine::ThreadPool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  absl::Status error_;
  std::thread thread_;
};

// The memory of one group that the caller owns (pinned, for the copy engines): the bf16
// compute copy and the fp32 gradient, TensorGroupShapes' elems each.
struct HostGroupBuffers {
  uint16_t* param = nullptr;
  float* grad = nullptr;
};

// Where the optimizer's state (fp32 master weights and AdamW's moments, 12 bytes per
// parameter) lives when not in this process' memory: a TensorHome (the memstore, whose NVMe
// tier holds what host RAM cannot), as tensors "<prefix>master/<group>/<chunk>",
// "<prefix>m/<group>/<chunk>" and "<prefix>v/<group>/<chunk>" of chunk_elems values (the last
// of a group shorter; a second generation's as "<prefix>master@1/..."). An update reads the
// next chunk and writes the previous one while it computes this one; the bf16 compute copies
// and fp32 gradients stay in the caller's buffers.
struct StateHome {
  engine::TensorHome* home = nullptr;  // not owned; null: in this process
  std::string prefix;
  engine::HomeTier tier = engine::HomeTier::kNvme;
  int64_t chunk_elems = int64_t{16} << 20;
  // The owner of `home` frees everything under its prefix itself (the worker, once per job):
  // the state does not free its tensors one by one when destroyed.
  bool freed_by_owner = false;
};

// bf16 (round to nearest even; NaN stays NaN) to and from fp32 bits, as the device's casts.
uint16_t ToBf16Bits(float f);
float FromBf16Bits(uint16_t b);

// Thread-compatible: one thread at a time calls the mutating methods (the queue's, in the
// streamed trainer).
class HostTrainingState {
 public:
  // `buffers`: one per group of TensorGroupShapes(config). In this process, master weights
  // start at zero (call SetParams or InitRandom). In a home, nothing is written there until
  // SetParams or InitRandom places the state (one write of it, not a zero copy first), and
  // AdamW and the getters fail with FAILED_PRECONDITION before. With `two_generations`, every
  // group but the embedding's holds its master weights and moments twice (generations 0 and
  // 1, in this process or in the home), so an update can be written beside the current values
  // and kept or dropped later (AdamW's `from` / `to`, SetCurrent). INVALID_ARGUMENT for a bad
  // config, buffer count or null buffer, or a chunk_elems <= 0 with a home.
  static absl::StatusOr<std::unique_ptr<HostTrainingState>> Create(
      const engine::ModelConfig& config, std::vector<HostGroupBuffers> buffers,
      const StateHome& home, engine::ThreadPool& pool, bool two_generations = false);
  // Frees what it put in a home (unless StateHome::freed_by_owner).
  ~HostTrainingState();

  // Bytes the state allocates itself: master weights and moments (of both generations), or,
  // when they live in a home, three chunks of each to update them in.
  static int64_t OwnBytes(const engine::ModelConfig& config, bool state_at_home,
                          bool two_generations = false);
  // Bytes of the master weights and both moments of every group (what a home holds), with a
  // second generation of every group but the embedding's.
  static int64_t HomeBytes(const engine::ModelConfig& config, bool two_generations = false);

  // Master weights from `params` (INVALID_ARGUMENT on a shape mismatch), their bf16 copies,
  // zero moments.
  absl::Status SetParams(const engine::ModelParams& params, engine::ThreadPool& pool);
  // The same with the weights read from `weights` a tensor group at a time, in NamedTensors
  // order (a checkpoint's file, or engine::RandomWeights): no whole copy of them beside the
  // master weights. Without `zero_moments` the moments are left as they are: the caller sets
  // every group's next (SetMomentsGroup, as a resume does), so a home's are written once, not
  // as zeros first (8 bytes a parameter of drive writes).
  absl::Status SetParams(engine::WeightsSource& weights, engine::ThreadPool& pool,
                         bool zero_moments = true);
  // The device's ResidentState::InitRandom(seed) values (kernels::FillNormal's hash), zero
  // moments.
  absl::Status InitRandom(uint64_t seed, engine::ThreadPool& pool);
  absl::Status GetParams(engine::ModelParams* out) const;
  absl::Status GetMoments(engine::ModelParams* m, engine::ModelParams* v) const;
  absl::Status SetMoments(const engine::ModelParams& m, const engine::ModelParams& v);
  // The same for tensor group g only (TensorGroupOf): its tensors of `out` are resized and
  // written, the others left as they are (`out` needs only its layers sized); Set reads only
  // group g's tensors. A checkpoint goes through a group at a time, never the whole state.
  // which: 0 master weights, 1 m, 2 v.
  absl::Status GetGroup(int which, size_t g, engine::ModelParams* out) const;
  absl::Status SetMomentsGroup(size_t g, const engine::ModelParams& m,
                               const engine::ModelParams& v);

  // AdamW on `segments` of group g (all of it when null) at 1-based `step`: the gradients are
  // multiplied by `coef` first, weight decay applies to matrices only, then the bf16 copy is
  // written. It reads generation `from` and writes generation `to` (-1: the current one; equal:
  // in place); the gradients are left as they were, so the update can run again. Moments in a
  // home are read and written a chunk at a time with the master weights, overlapping the
  // update; the first error of the home is returned once nothing is in flight, with the chunks
  // before it updated and the rest not. FAILED_PRECONDITION for a generation the group does
  // not have.
  absl::Status AdamW(size_t g, const std::vector<GroupSegment>* segments,
                     const engine::AdamWHyper& hyper, int64_t step, float coef,
                     engine::ThreadPool& pool, int from = -1, int to = -1);
  // The generation GetParams, GetMoments, SetParams, SetMoments and AdamW's default use.
  int current(size_t g) const { return current_[g]; }
  void SetCurrent(size_t g, int generation) { current_[g] = generation; }
  // Rewrites group g's bf16 copy from its current master weights (after dropping an update).
  absl::Status RewriteBf16(size_t g, engine::ThreadPool& pool);

  // Adds the tokens' input gradients `dx` (bf16, [ids.size(), hidden]) into their rows of the
  // embedding group's gradient: untied, after zeroing the rows the previous call wrote (the
  // group holds only the embedding's gradient); tied, onto the head's gradient already there.
  // Returns the group's squared L2 norm (untied: over the rows of `ids`, the others are zero).
  double AddEmbeddingGradient(const std::vector<int32_t>& ids, const uint16_t* dx,
                              engine::ThreadPool& pool);
  // Each token's row of the bf16 embedding, in token order, into `out` ([ids.size(), hidden]).
  // `pool` may be null (this thread only).
  void GatherEmbeddingRows(const std::vector<int32_t>& ids, uint16_t* out,
                           engine::ThreadPool* pool) const;
  // The embedding group's segments holding the rows `ids` uses (runs of adjacent rows), and
  // the others; together they cover the table once.
  static void SplitEmbeddingRows(const std::vector<int32_t>& ids, int64_t vocab, int64_t hidden,
                                 std::vector<GroupSegment>* rows,
                                 std::vector<GroupSegment>* rest);
  // Sum of squares of x over `segments` in fixed chunks summed in order (the same result
  // whatever the threads).
  static double SumSquares(engine::ThreadPool& pool, const float* x,
                           const std::vector<GroupSegment>& segments);

  const std::vector<TensorGroupShape>& shapes() const { return shapes_; }
  size_t embed_group() const { return config_.num_hidden_layers; }
  bool state_at_home() const { return home_.home != nullptr; }

 private:
  HostTrainingState(const engine::ModelConfig& config, std::vector<HostGroupBuffers> buffers,
                    const StateHome& home);
  // which: 0 master weights, 1 m, 2 v; in generation `gen`.
  std::string StateId(int which, size_t g, int64_t chunk, int gen) const;
  // The generations group g holds: 2 for all but the embedding with two generations.
  int Generations(size_t g) const { return two_generations_ && g != embed_group() ? 2 : 1; }
  int64_t Chunks(size_t g) const;
  // Chunk slot k (0..2) of `which`, slot_elems_ values.
  float* Slot(int64_t k, int which) const {
    return slots_.get() + (k % 3 * 3 + which) * slot_elems_;
  }
  // FAILED_PRECONDITION while a home holds no state yet.
  absl::Status CheckPlaced() const;
  // AdamW of group g with its state in the home, chunk by chunk.
  absl::Status HomeAdamW(size_t g, const std::vector<GroupSegment>& segments,
                         const engine::AdamWHyper& hyper, int64_t step, float coef,
                         engine::ThreadPool& pool, int from, int to);
  // Zero moments of every group.
  absl::Status ResetMoments(engine::ThreadPool& pool);
  absl::Status WriteBf16(engine::ThreadPool& pool);
  float* Master(size_t g, int gen) const { return master_[gen][g].get(); }
  float* M(size_t g, int gen) const { return m_[gen][g].get(); }
  float* V(size_t g, int gen) const { return v_[gen][g].get(); }
  // which: 0 master, 1 m, 2 v; every group, or group g.
  absl::Status CopyOut(int which, engine::ModelParams* out) const;
  absl::Status CopyIn(int which, const engine::ModelParams& in);
  absl::Status CopyOutGroup(int which, size_t g, engine::ModelParams* out) const;
  absl::Status CopyInGroup(int which, size_t g, const engine::ModelParams& in);

  const engine::ModelConfig config_;
  const std::vector<TensorGroupShape> shapes_;
  const std::vector<HostGroupBuffers> buffers_;
  const StateHome home_;
  bool two_generations_ = false;
  // Per generation and group; generation 1 only with two generations (none for the
  // embedding), all empty with a home.
  std::vector<std::unique_ptr<float[]>> master_[2], m_[2], v_[2];
  std::vector<int> current_;
  // With a home: three chunk slots of master weights, m and v each (one updated, one being
  // read, one being written), and whether SetParams or InitRandom has placed the state there.
  std::unique_ptr<float[]> slots_;
  int64_t slot_elems_ = 0;
  bool placed_ = true;
  std::vector<int64_t> grad_rows_;                        // rows the last gradient wrote
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_HOST_STATE_H_
