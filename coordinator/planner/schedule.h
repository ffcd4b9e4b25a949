// A step schedule (DESIGN §2 "everything is a schedule"): the ordered ops of one training step
// for every worker and for the host, with their dependencies. The simulator predicts it; the
// worker will execute it. Plain data; thread-compatible.
//
// Execution rules, shared by the simulator and (later) the worker:
//  - Ops on the same (worker, lane) run one at a time, in the order they appear in `ops`.
//  - An op starts when its lane is free and every op in `deps` has finished.
//  - A compute op streams its activations concurrently with its arithmetic
//    (activation_in_bytes host→device, activation_out_bytes device→host, through a ring of
//    micro-batch buffers), so it is one op per layer and micro-batch group.
#ifndef LUMEN_COORDINATOR_PLANNER_SCHEDULE_H_
#define LUMEN_COORDINATOR_PLANNER_SCHEDULE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "coordinator/planner/model_desc.h"

namespace lumen {

enum class Tier { kDevice = 0, kHost = 1, kNvme = 2 };
inline constexpr int kNumTiers = 3;
const char* TierName(Tier t);  // "device", "host", "nvme"

enum class OpKind {
  kCompute,    // forward or recompute+backward of one layer over a group of micro-batches
  kTransfer,   // bytes of one tensor class from `src` to `dst` (prefetch, offload, write-back)
  kOptimizer,  // AdamW of one layer, on the worker's device (worker >= 0) or the host CPU
  kReduce,     // host: sum the partial gradients of one layer (replicas, micro-batch groups)
  kRelease,    // frees a device buffer slot; zero duration
  kWait,       // a join point (e.g. the end of the step); zero duration
};
const char* OpKindName(OpKind k);

enum class Phase { kNone, kForward, kBackward };

// Serialization lanes: a worker's compute stream and copy streams, the host's queues.
enum class Lane {
  kCompute,       // worker: kernels
  kHostToDevice,  // worker: copies in
  kDeviceToHost,  // worker: copies out
  kHostCpu,       // host: optimizer and reductions
  kNvmeParams,    // host: NVMe reads/writes of parameters (one queue per purpose, so a
  kNvmeOptimizer, //   read-ahead blocked on a buffer never holds up another purpose)
  kNvmeActivations,
  kNvmeWriteBack,
  kControl,       // releases and waits
};
const char* LaneName(Lane l);

struct Op {
  int32_t id = 0;  // index in Schedule::ops
  OpKind kind = OpKind::kWait;
  // The worker whose device the op uses; -1 for host ops. Host-side NVMe ops done on behalf of
  // one worker (its parameter reads) or one pipeline stage (checkpoints: the stage's first
  // worker) carry that worker, which only picks their queue.
  int32_t worker = -1;
  Lane lane = Lane::kControl;
  int32_t layer = -1;  // index into ModelDesc::layers; -1 when none
  int32_t group = -1;  // micro-batch group; -1 when none
  Phase phase = Phase::kNone;
  TensorClass tensor = TensorClass::kParams;  // kTransfer, kRelease
  Tier src = Tier::kHost;                     // kTransfer
  Tier dst = Tier::kDevice;                   // kTransfer
  int64_t bytes = 0;                          // kTransfer; kReduce: host bytes read + written
  double flops = 0;                           // kCompute
  int64_t micro_batches = 0;                  // kCompute
  int64_t activation_in_bytes = 0;            // kCompute: streamed host→device meanwhile
  int64_t activation_out_bytes = 0;           // kCompute: streamed device→host meanwhile
  int64_t params = 0;                         // kOptimizer
  // Calls to the memstore the op makes (one per tensor moved or updated): host CPU work,
  // which a CPU device pays for out of its own cores (DeviceProfile::shares_host_cpu).
  int64_t host_calls = 0;
  int32_t slot = -1;  // device buffer slot the op fills or frees (kTransfer to device, kRelease)
  std::vector<int32_t> deps;
  std::string label;  // for people: "fwd layers.3 g0", "prefetch params layers.4"
};

struct Schedule {
  int32_t num_workers = 1;
  std::vector<Op> ops;

  // Appends `op` (its id is set) and returns the id.
  int32_t Add(Op op) {
    op.id = static_cast<int32_t>(ops.size());
    ops.push_back(std::move(op));
    return ops.back().id;
  }
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_PLANNER_SCHEDULE_H_
