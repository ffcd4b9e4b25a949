// Runs one job's training on this worker's device: converts the JobSpec into engine options,
// steps the trainer, reports each step and writes checkpoints. Thread-compatible: one Run at a
// time per instance.
#ifndef LUMEN_WORKER_TASK_RUNNER_H_
#define LUMEN_WORKER_TASK_RUNNER_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/node_options.h"
#include "proto/lumen.pb.h"
#include "memstore/memstore_client.h"
#include "worker/engine/offload_trainer.h"
#include "worker/engine/trainer.h"

namespace lumen {

struct TaskRunnerOptions {
  // "worker-0", for messages.
  std::string worker_name = "worker-0";
  // The device this worker drives: the CPU device, or GPU `device_index` (worker/cuda_jobs.h:
  // jobs resident on the GPU, or streamed through this process' host memory).
  DeviceKind device = DeviceKind::kCpu;
  int device_index = 0;
  // Threads for the CPU kernels, or a GPU worker's host AdamW; 0 uses every CPU this process
  // may run on.
  int num_threads = 0;
  // Device memory the training may use. A job whose training state does not fit streams its
  // tensors through `memstore` layer by layer (engine::OffloadTrainer); losses and weights are
  // the same bit for bit either way.
  int64_t device_memory_budget_bytes = 0;
  // Where offloaded tensors live; null = nowhere, so a CPU-device job that does not fit fails
  // (a GPU job streams through the worker's memory, its moments here only with kNvme below).
  MemstoreClient* memstore = nullptr;
  // The memstore tier of the Adam state when offloading (the other classes use host memory).
  // On a CUDA device, kNvme puts a streamed job's moments in the memstore; kHost keeps them in
  // this process with the rest of its state.
  engine::HomeTier optimizer_state_tier = engine::HomeTier::kHost;
  // engine::OffloadOptions::overlap_optimizer (lumend --optimizer-overlap backward); on a GPU,
  // cuda::CudaOffloadOptions::speculate for streamed jobs that clip.
  bool optimizer_overlaps_backward = false;
  // The link model: host<->device bytes/s per direction for offloaded tensors; 0 = as fast as
  // the memstore serves them. Lets the CPU device run at a GPU node's FLOPs-per-byte ratio.
  double link_bytes_per_s = 0;
};

// Engine options for a validated spec.
absl::StatusOr<engine::TrainerOptions> TrainerOptionsFromSpec(const JobSpec& spec,
                                                              int num_threads);

// The parameter reads of the coordinator's step schedule (RunTaskRequest.schedule) for a model
// of `num_layers` decoder layers, at the trainer's compute ops (engine::ParameterSchedule): a
// read is issued when the compute ops its dependencies wait for have finished, and dropped when
// that is after the op that needs it. INVALID_ARGUMENT naming the op when the schedule's compute
// ops are not the trainer's order (forward from the embedding through the head, backward from
// the head to the embedding, every micro-batch in one group) or name a layer the model lacks;
// an empty schedule gives an empty result.
absl::StatusOr<engine::ParameterSchedule> ParameterScheduleFromProto(const StepSchedule& schedule,
                                                                     int64_t num_layers);

// Whether `spec` can train on this worker of an otherwise idle node, from its shape alone, and
// what it would hold of the node's shared memory while it runs (the coordinator runs jobs side
// by side while their claims fit): its largest op must fit the device budget, and what does
// not stay on the device must fit the capacity of the memstore tiers it goes to (on a CUDA
// device: cuda_jobs.h's CheckCudaTask with `host_available_bytes` of host memory, 0 for the
// host's available memory now, and the memstore's NVMe tier for AdamW's moments when they go
// there). RESOURCE_EXHAUSTED naming the op or tier, the bytes, and what to change;
// INVALID_ARGUMENT for a spec the engine refuses; the memstore's error when it cannot tell its
// capacity.
absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec, const TaskRunnerOptions& options,
                                         int64_t host_available_bytes = 0);

// Trains `request.spec()` to the end. `emit` receives every step record and every completed
// checkpoint (a replica other than 0 of a job on several workers emits neither: replica 0's
// are the job's); `observe`, when set, every step record of this worker, every replica's
// included, with `tokens` this replica's share of the step (for the worker's own metrics);
// `cancelled` is polled between steps. Returns CANCELLED when it saw
// cancellation, the engine's error otherwise. Checkpoints go to
// <output_dir>/step-<N> (written to a temporary name first, then renamed), each with the token
// file's tokenizer (client/tokenizer_info.h) when its sidecar names one.
absl::Status RunTask(const RunTaskRequest& request, const TaskRunnerOptions& options,
                     const std::function<void(const TaskEvent&)>& emit,
                     const std::function<bool()>& cancelled,
                     const std::function<void(const TaskEvent&)>& observe = nullptr);

}  // namespace lumen

#endif  // LUMEN_WORKER_TASK_RUNNER_H_
