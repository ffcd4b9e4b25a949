#include "worker/task_runner.h"

#include <filesystem>
#include <fstream>
#include <optional>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/tokenizer_info.h"
#include "common/cpus.h"
#include "common/job_tensors.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/cuda_jobs.h"
#include "worker/device_trainer.h"
#include "worker/engine/checkpoint.h"
#include "worker/memstore_collective.h"
#include "worker/memstore_tensor_home.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

// `tokenizer` (read when the task started; null when the token file has none) goes into the
// checkpoint beside the weights.
// The CPU device's trainer: engine::OffloadTrainer, resident or streaming through the memstore.
class CpuDeviceTrainer : public DeviceTrainer {
 public:
  explicit CpuDeviceTrainer(std::unique_ptr<engine::OffloadTrainer> trainer)
      : trainer_(std::move(trainer)) {}
  absl::StatusOr<engine::OffloadStepResult> Step() override { return trainer_->Step(); }
  int64_t step() const override { return trainer_->step(); }
  absl::Status Export(const std::string& dir) override { return trainer_->Export(dir); }
  int64_t TrainingStateBytes() const override { return trainer_->TrainingStateBytes(); }
  bool resident() const override { return trainer_->resident(); }
  const std::vector<engine::TraceEvent>& first_step_trace() const override {
    return trainer_->first_step_trace();
  }

 private:
  std::unique_ptr<engine::OffloadTrainer> trainer_;
};

absl::Status WriteCheckpoint(DeviceTrainer& trainer, const RunTaskRequest& request,
                             const TokenizerFiles* tokenizer, int64_t step,
                             const std::function<void(const TaskEvent&)>& emit) {
  const fs::path final_dir = fs::path(request.output_dir()) / absl::StrCat("step-", step);
  const fs::path tmp_dir = fs::path(request.output_dir()) / absl::StrCat(".step-", step, ".tmp");
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", tmp_dir.string(), ": ",
                                            ec.message()));
  }
  RETURN_IF_ERROR(trainer.Export(tmp_dir.string()));
  if (tokenizer != nullptr) {
    RETURN_IF_ERROR(WriteCheckpointTokenizer(*tokenizer, tmp_dir.string(),
                                             request.spec().model().max_position_embeddings()));
  }
  fs::remove_all(final_dir, ec);
  fs::rename(tmp_dir, final_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp_dir.string(), " to ",
                                            final_dir.string(), ": ", ec.message()));
  }
  TaskEvent event;
  event.set_checkpoint(final_dir.string());
  emit(event);
  LOG(INFO) << request.job_id() << ": checkpoint " << final_dir.string();
  return absl::OkStatus();
}

// The first step's trace as a Chrome trace (open it in Perfetto or chrome://tracing): compute
// ops on one row, waits on another. Written to a temporary name first, then renamed.
absl::Status WriteStepTrace(const std::vector<engine::TraceEvent>& events,
                            const std::string& path) {
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  for (size_t i = 0; i < events.size(); ++i) {
    const engine::TraceEvent& e = events[i];
    const bool compute = std::string(e.category) == "compute";
    absl::StrAppend(&out, i > 0 ? ",\n" : "\n", "{\"name\":", JsonQuote(e.name),
                    ",\"cat\":", JsonQuote(e.category), ",\"ph\":\"X\",\"pid\":1,\"tid\":",
                    compute ? 1 : 2, ",\"ts\":", static_cast<int64_t>(e.start_s * 1e6),
                    ",\"dur\":", static_cast<int64_t>(e.duration_s * 1e6), "}");
  }
  out += "\n],\"otherData\":{\"rows\":\"tid 1 = device compute, tid 2 = device waiting\"}}\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << out;
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<engine::TrainerOptions> TrainerOptionsFromSpec(const JobSpec& spec,
                                                              int num_threads) {
  engine::TrainerOptions o;
  const ModelSpec& m = spec.model();
  o.model.hidden_size = m.hidden_size();
  o.model.intermediate_size = m.intermediate_size();
  o.model.num_hidden_layers = m.num_hidden_layers();
  o.model.num_attention_heads = m.num_attention_heads();
  o.model.num_key_value_heads = m.num_key_value_heads();
  o.model.vocab_size = m.vocab_size();
  o.model.max_position_embeddings = m.max_position_embeddings();
  o.model.rope_theta = m.rope_theta();
  o.model.rms_norm_eps = m.rms_norm_eps();
  o.model.tie_word_embeddings = m.tie_word_embeddings();
  o.model.init_std = m.init_std();
  const OptimizerSpec& opt = spec.optimizer();
  if (opt.betas_size() != 2) {
    return absl::InvalidArgumentError("optimizer.betas: needs exactly 2 values");
  }
  o.optimizer.lr = opt.lr();
  o.optimizer.beta1 = opt.betas(0);
  o.optimizer.beta2 = opt.betas(1);
  o.optimizer.eps = opt.eps();
  o.optimizer.weight_decay = opt.weight_decay();
  o.optimizer.grad_clip = opt.grad_clip();
  o.optimizer.schedule = opt.schedule().kind() == SCHEDULE_KIND_COSINE
                             ? engine::ScheduleKind::kCosine
                             : engine::ScheduleKind::kConstant;
  o.optimizer.warmup_steps = opt.schedule().warmup_steps();
  o.optimizer.min_lr = opt.schedule().min_lr();
  const TrainSpec& t = spec.train();
  o.train.steps = t.steps();
  o.train.seq_len = t.seq_len();
  o.train.micro_batch_size = t.micro_batch_size();
  o.train.grad_accum_steps = t.grad_accum_steps();
  o.train.seed = t.seed();
  const DataSpec& d = spec.data();
  o.data.path = d.path();
  o.data.token_dtype = d.token_dtype() == TOKEN_DTYPE_UINT32 ? engine::TokenDtype::kUint32
                                                       : engine::TokenDtype::kUint16;
  o.data.order = d.order() == DATA_ORDER_SHUFFLED ? engine::DataOrder::kShuffled
                                                  : engine::DataOrder::kSequential;
  o.data.seed = d.seed();
  o.init_from = spec.init_from();
  o.num_threads = num_threads > 0 ? num_threads : UsableCpus();
  return o;
}

absl::StatusOr<engine::ParameterSchedule> ParameterScheduleFromProto(const StepSchedule& schedule,
                                                                     int64_t num_layers) {
  engine::ParameterSchedule out;
  if (schedule.ops_size() == 0) return out;
  const int L = static_cast<int>(num_layers);
  const int ops = 2 * L + 3;
  // The planner runs forward 0..L+1 and backward L+1..0 (planner layers); the trainer runs the
  // head's forward and backward as one op.
  std::vector<std::pair<ScheduleOp::Phase, int>> expected;
  for (int l = 0; l <= L + 1; ++l) expected.emplace_back(ScheduleOp::FORWARD, l);
  for (int l = L + 1; l >= 0; --l) expected.emplace_back(ScheduleOp::BACKWARD, l);
  auto trainer_op = [L](ScheduleOp::Phase phase, int layer) {
    if (phase == ScheduleOp::FORWARD) return layer;
    return layer == L + 1 ? L + 1 : 2 * L + 2 - layer;
  };
  auto describe = [](ScheduleOp::Phase phase, int layer) {
    return absl::StrCat(phase == ScheduleOp::FORWARD ? "forward" : "backward", " of layer ",
                        layer);
  };
  // Per schedule op: the trainer op it is (compute), or the last trainer op it waits for
  // (others); -1 when none.
  std::vector<int> after(schedule.ops_size(), -1);
  std::vector<std::pair<int, int>> prefetches;  // (schedule op, planner layer)
  std::vector<int> needed_by(schedule.ops_size(), -1);  // prefetch -> trainer op that needs it
  size_t next = 0;
  for (int i = 0; i < schedule.ops_size(); ++i) {
    const ScheduleOp& op = schedule.ops(i);
    int wait = -1;
    for (int d : op.deps()) {
      if (d < 0 || d >= i) {
        return absl::InvalidArgumentError(absl::StrCat(
            "schedule op ", i, " (", op.label(), ") depends on op ", d, ", which is not before it"));
      }
      wait = std::max(wait, after[d]);
    }
    after[i] = wait;
    if (op.kind() == ScheduleOp::COMPUTE) {
      if (next >= expected.size() || expected[next] != std::make_pair(op.phase(), op.layer())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "schedule op ", i, " (", op.label(), ") is the ", describe(op.phase(), op.layer()),
            next < expected.size()
                ? absl::StrCat(", but the trainer runs the ",
                               describe(expected[next].first, expected[next].second), " next")
                : ", but the trainer has no compute op left",
            " (it runs every layer over all micro-batches, forward then backward)"));
      }
      ++next;
      after[i] = trainer_op(op.phase(), op.layer());
      for (int d : op.deps()) {
        if (needed_by[d] == -1 && schedule.ops(d).kind() == ScheduleOp::PREFETCH) {
          needed_by[d] = after[i];
        }
      }
    } else if (op.kind() == ScheduleOp::PREFETCH && op.tensor() == "params") {
      if (op.layer() < 0 || op.layer() > L + 1) {
        return absl::InvalidArgumentError(absl::StrCat("schedule op ", i, " (", op.label(),
                                                       ") reads layer ", op.layer(),
                                                       "; the model has layers 0 to ", L + 1));
      }
      prefetches.emplace_back(i, op.layer());
    }
  }
  if (next != expected.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the schedule ends before the ", describe(expected[next].first, expected[next].second)));
  }
  out.at_op.assign(ops, {});
  for (auto [i, layer] : prefetches) {
    const int at = after[i] + 1;  // once what it waits for has finished
    if (needed_by[i] < 0 || at > needed_by[i]) continue;
    out.at_op[at].push_back(layer);
  }
  return out;
}

namespace {

// Capacity of the memstore's tiers: what a job may use on an idle node (jobs beside it are
// the coordinator's to count).
absl::StatusOr<TierCapacity> MemstoreCapacity(MemstoreClient* memstore) {
  ASSIGN_OR_RETURN(GetMemstoreStatsReply stats, memstore->GetStats(absl::Seconds(5)));
  return TierCapacityOf(stats);
}

// RESOURCE_EXHAUSTED when `what` (the optimizer state a job keeps on NVMe) does not fit the
// memstore's NVMe tier.
absl::Status FitsNvme(const std::string& what, int64_t bytes, int64_t nvme_capacity) {
  if (bytes <= nvme_capacity) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      what, " need ", engine::FormatBytes(bytes), " on the memstore's NVMe tier but ",
      "it holds ", engine::FormatBytes(nvme_capacity),
      ". Give lumend more --nvme-dir space or use --optimizer-state-tier host"));
}

// True when a streamed job on a CUDA worker keeps its master weights and AdamW's moments in the
// memstore.
bool CudaStateInMemstore(const TaskRunnerOptions& options) {
  return options.memstore != nullptr &&
         options.optimizer_state_tier == engine::HomeTier::kNvme;
}

// RESOURCE_EXHAUSTED when the largest op of a job on the CPU device does not fit the budget.
absl::Status LargestOpFits(const TaskRunnerOptions& options,
                           const engine::OffloadRequirements& needs) {
  const int64_t budget = options.device_memory_budget_bytes;
  if (needs.largest_op_bytes <= budget) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the ", needs.largest_op, " needs ", engine::FormatBytes(needs.largest_op_bytes),
      " of device memory; ", options.worker_name, "'s budget is ", engine::FormatBytes(budget),
      ". Lower train.micro_batch_size or seq_len, or start lumend with a larger "
      "--device-memory"));
}

// CheckTask for one of `world` replicas on the CPU device whose state does not fit its device
// (`needs`, for the largest share of the micro-batches): the replicas share one copy of the
// parameters and AdamW moments in the memstore (OffloadOptions::replica), and each keeps its
// gradients and activation checkpoints there. Claims are per worker: a 1/world share of the
// shared state and the replica's own tensors.
absl::StatusOr<ResourceClaims> CheckOffloadedReplica(const TaskRunnerOptions& options,
                                                     const engine::ModelConfig& model,
                                                     const engine::OffloadRequirements& needs,
                                                     int64_t world) {
  const int64_t budget = options.device_memory_budget_bytes;
  RETURN_IF_ERROR(LargestOpFits(options, needs));
  ASSIGN_OR_RETURN(const TierCapacity capacity, MemstoreCapacity(options.memstore));
  const bool moments_on_nvme = options.optimizer_state_tier == engine::HomeTier::kNvme;
  const int64_t params = needs.parameter_bytes, moments = 2 * params;
  const int64_t shared = params + (moments_on_nvme ? 0 : moments);
  const int64_t own = params + needs.activation_bytes;  // gradients, activation checkpoints
  // The exchange carries each tensor's gradient square sum (fewer than 16 per layer).
  const int64_t exchange =
      MemstoreCollective::ClaimBytes(0, 16 * (model.num_hidden_layers + 2),
                                     static_cast<int>(world));
  const int64_t host_needed = shared + world * (own + exchange);
  if (host_needed > capacity.host_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "resources.workers: ", world, " replicas of an offloaded job share its parameters",
        moments_on_nvme ? "" : " and AdamW moments", " (", engine::FormatBytes(shared),
        ") in the memstore's host memory and each keeps its gradients and activation "
        "checkpoints there (", engine::FormatBytes(own), " each): ",
        engine::FormatBytes(host_needed), ", but it holds ",
        engine::FormatBytes(capacity.host_bytes),
        ". Start lumend with a larger --host-memory",
        moments_on_nvme ? "" : " or --optimizer-state-tier nvme", ", or use fewer workers"));
  }
  if (moments_on_nvme) {
    RETURN_IF_ERROR(FitsNvme("AdamW moments", moments, capacity.nvme_bytes));
  }
  ResourceClaims claims;
  claims.set_worker_host_bytes(budget);  // the CPU device's memory
  claims.set_memstore_host_bytes((shared + world - 1) / world + own + exchange);
  claims.set_memstore_nvme_bytes(moments_on_nvme ? (moments + world - 1) / world : 0);
  return claims;
}

// CheckTask for one replica of a job on `world` workers: on a GPU, the largest share of the
// micro-batches must keep the whole training state resident; on the CPU device it is resident
// when it fits, and offloaded with the state shared otherwise.
absl::StatusOr<ResourceClaims> CheckReplica(const JobSpec& spec, const TaskRunnerOptions& options,
                                            engine::TrainerOptions trainer_options,
                                            int64_t world) {
  if (options.memstore == nullptr) {
    return absl::FailedPreconditionError(
        "resources.workers: replicas sum their gradients through the memstore, and this worker "
        "has none");
  }
  const engine::MicroBatchShare share =
      engine::MicroBatchShareOf(spec.train().grad_accum_steps(), 0, static_cast<int>(world));
  trainer_options.train.grad_accum_steps = share.count;
  const int64_t params = engine::ParameterCount(trainer_options.model);
  ResourceClaims claims;
  if (options.device == DeviceKind::kCuda) {
    ASSIGN_OR_RETURN(const CudaJobMemory memory,
                     CheckCudaTask(trainer_options, options.worker_name,
                                   options.device_memory_budget_bytes, /*host_bytes=*/-1));
    if (memory.streamed) {
      return ReplicaDoesNotFit(trainer_options, options.worker_name,
                               options.device_memory_budget_bytes, world);
    }
    // The gradients cross to the host to be summed: an fp32 copy of them in the worker, and
    // the exchange's buffers, a share of them each.
    claims.set_worker_host_bytes(4 * params + 2 * 4 * (params / world + 1));
  } else {
    ASSIGN_OR_RETURN(engine::OffloadRequirements needs,
                     engine::OffloadTrainer::Requirements(trainer_options));
    const int64_t budget = options.device_memory_budget_bytes;
    const int64_t resident = needs.resident_bytes();
    if (resident > budget) {
      return CheckOffloadedReplica(options, trainer_options.model, needs, world);
    }
    claims.set_worker_host_bytes(resident);
  }
  claims.set_memstore_host_bytes(
      MemstoreCollective::ClaimBytes(params, 1, static_cast<int>(world)));
  ASSIGN_OR_RETURN(const TierCapacity capacity, MemstoreCapacity(options.memstore));
  if (world * claims.memstore_host_bytes() > capacity.host_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "resources.workers: ", world, " replicas exchange their gradients through the "
        "memstore's host memory: ", engine::FormatBytes(world * claims.memstore_host_bytes()),
        ", but it holds ", engine::FormatBytes(capacity.host_bytes),
        ". Start lumend with a larger --host-memory"));
  }
  return claims;
}

}  // namespace

absl::StatusOr<ResourceClaims> CheckTask(const JobSpec& spec, const TaskRunnerOptions& options,
                                         int64_t host_available_bytes) {
  ASSIGN_OR_RETURN(engine::TrainerOptions trainer_options, TrainerOptionsFromSpec(spec, 1));
  if (!spec.resume_from().empty()) {
    const std::string optimizer =
        (fs::path(spec.resume_from()) / engine::kOptimizerFile).string();
    absl::StatusOr<int64_t> step = engine::OptimizerStateStep(optimizer, trainer_options.model);
    if (!step.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("resume_from: ", step.status().message()));
    }
    if (*step >= spec.train().steps()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resume_from: ", spec.resume_from(), " is step ", *step, "; train.steps ",
          spec.train().steps(), " must be larger for the job to train anything"));
    }
  }
  ResourceClaims claims;
  const int64_t world = std::max<int64_t>(1, spec.resources().workers());
  if (world > 1) return CheckReplica(spec, options, std::move(trainer_options), world);
  if (options.device == DeviceKind::kCuda) {
    ASSIGN_OR_RETURN(const CudaJobMemory memory,
                     CheckCudaTask(trainer_options, options.worker_name,
                                   options.device_memory_budget_bytes,
                                   host_available_bytes > 0 ? host_available_bytes
                                                            : kHostBytesAvailable,
                                   CudaStateInMemstore(options),
                                   options.optimizer_overlaps_backward));
    claims.set_worker_host_bytes(memory.host_bytes);
    if (memory.state_home_bytes == 0) return claims;
    ASSIGN_OR_RETURN(const TierCapacity capacity, MemstoreCapacity(options.memstore));
    RETURN_IF_ERROR(FitsNvme("fp32 master weights and AdamW moments", memory.state_home_bytes,
                             capacity.nvme_bytes));
    claims.set_memstore_nvme_bytes(memory.state_home_bytes);
    return claims;
  }
  ASSIGN_OR_RETURN(engine::OffloadRequirements needs,
                   engine::OffloadTrainer::Requirements(trainer_options));
  const int64_t budget = options.device_memory_budget_bytes;
  RETURN_IF_ERROR(LargestOpFits(options, needs));
  const int64_t params = needs.parameter_bytes;
  const int64_t resident = needs.resident_bytes();
  // The CPU device's memory is this process' host memory, up to the budget.
  claims.set_worker_host_bytes(std::min(resident, budget));
  if (resident <= budget) return claims;  // everything stays on the device
  if (options.memstore == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the training state (", engine::FormatBytes(needs.training_state_bytes()),
        ") does not fit ", options.worker_name, "'s device budget ",
        engine::FormatBytes(budget), " and the worker has no memstore to offload to"));
  }
  ASSIGN_OR_RETURN(const TierCapacity capacity, MemstoreCapacity(options.memstore));
  const int64_t host_capacity = capacity.host_bytes, nvme_capacity = capacity.nvme_bytes;
  const bool moments_on_nvme = options.optimizer_state_tier == engine::HomeTier::kNvme;
  // Parameters, gradients and activation checkpoints live in host memory; AdamW's m and v in
  // the optimizer-state tier. AdamW overlapping the backward keeps a second copy of the
  // parameters and moments.
  const int64_t copies = options.optimizer_overlaps_backward ? 2 : 1;
  const int64_t moments = copies * 2 * params;
  const int64_t host_needed =
      (1 + copies) * params + needs.activation_bytes + (moments_on_nvme ? 0 : moments);
  if (host_needed > host_capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "offloading needs ", engine::FormatBytes(host_needed),
        " of the memstore's host memory (parameters and gradients ",
        engine::FormatBytes((1 + copies) * params), ", activation checkpoints ",
        engine::FormatBytes(needs.activation_bytes),
        moments_on_nvme ? ""
                        : absl::StrCat(", AdamW moments ", engine::FormatBytes(moments)),
        ") but it holds ", engine::FormatBytes(host_capacity), ". Start lumend with a larger "
        "--host-memory",
        moments_on_nvme ? "" : " or --optimizer-state-tier nvme", ", or train a smaller model"));
  }
  if (moments_on_nvme) RETURN_IF_ERROR(FitsNvme("AdamW moments", moments, nvme_capacity));
  claims.set_memstore_host_bytes(host_needed);
  claims.set_memstore_nvme_bytes(moments_on_nvme ? moments : 0);
  return claims;
}

absl::Status RunTask(const RunTaskRequest& request, const TaskRunnerOptions& options,
                     const std::function<void(const TaskEvent&)>& emit,
                     const std::function<bool()>& cancelled,
                     const std::function<void(const TaskEvent&)>& observe) {
  const JobSpec& spec = request.spec();
  ASSIGN_OR_RETURN(engine::TrainerOptions trainer_options,
                   TrainerOptionsFromSpec(spec, options.num_threads));
  // A replica of a job on several workers: its share of each step's micro-batches, gradients
  // summed with the other replicas through the memstore.
  const int world = std::max(1, request.world_size());
  const int rank = request.rank();
  std::unique_ptr<MemstoreCollective> collective;
  engine::MicroBatchShare share{0, spec.train().grad_accum_steps()};
  if (world > 1) {
    if (options.memstore == nullptr || rank < 0 || rank >= world) {
      return absl::FailedPreconditionError(absl::StrCat(
          "replica ", rank, " of ", world, ": replicas need the memstore to sum gradients"));
    }
    share = engine::MicroBatchShareOf(spec.train().grad_accum_steps(), rank, world);
    if (share.count == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.grad_accum_steps ", spec.train().grad_accum_steps(),
          " gives replica ", rank, " of ", world, " no micro-batch"));
    }
    trainer_options.train.grad_accum_steps = share.count;
    collective = std::make_unique<MemstoreCollective>(options.memstore, request.job_id(),
                                                      request.run(), rank, world, cancelled);
  }
  engine::ReplicaOptions replica;
  replica.collective = collective.get();
  replica.micro_batch_offset = share.first;
  replica.global_micro_batches = spec.train().grad_accum_steps();
  // Replica 0 (or the only one) reports the steps and writes the checkpoints.
  const bool reports = rank == 0;
  auto report = [&emit, reports](const TaskEvent& event) {
    if (reports) emit(event);
  };
  // The job's own latest checkpoint when its run was interrupted, else the spec's.
  const std::string& resume_from =
      request.resume_from().empty() ? spec.resume_from() : request.resume_from();
  if (!resume_from.empty()) {
    const fs::path optimizer = fs::path(resume_from) / engine::kOptimizerFile;
    std::error_code ec;
    if (!fs::is_regular_file(optimizer, ec)) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot resume from ", resume_from, ": ", optimizer.string(),
                       " is missing"));
    }
    trainer_options.init_from = resume_from;
    trainer_options.optimizer_state_from = optimizer.string();
  }
  // The job's tensors in the memstore, under its id and this run's (a stopped run's task may
  // still be inside a step, minutes on a large model, when the job runs again on another
  // worker; what it writes late must not land in this run's state); freed when the task ends,
  // however it ends, and the coordinator frees every run's when the job's run ends.
  std::unique_ptr<MemstoreTensorHome> home;
  if (options.memstore != nullptr &&
      (options.device == DeviceKind::kCpu || CudaStateInMemstore(options))) {
    home = std::make_unique<MemstoreTensorHome>(
        options.memstore, JobRunTensorPrefix(request.job_id(), request.run()));
  }
  // A replica other than 0 frees only its own tensors: the others may still read the state the
  // replicas share, which replica 0 placed and frees.
  struct FreeHome {
    MemstoreTensorHome* home;
    std::string under;
    ~FreeHome() {
      if (home == nullptr) return;
      if (absl::Status s = home->FreeAll(under); !s.ok()) {
        LOG(WARNING) << "freeing job tensors: " << s;
      }
    }
  } free_home{home.get(), rank > 0 ? engine::OffloadTrainer::ReplicaPrefix(rank) : ""};
  std::unique_ptr<engine::ThrottledTensorHome> link;
  std::unique_ptr<DeviceTrainer> trainer;
  if (options.device == DeviceKind::kCuda) {
    if (request.schedule().ops_size() > 0) {
      LOG(INFO) << request.job_id() << ": the coordinator's schedule is for streaming "
                << "through the memstore; a CUDA device keeps the job resident or streams it "
                << "through this worker's host memory on its own schedule";
    }
    // Streamed with --optimizer-state-tier nvme, the master weights and AdamW's moments live
    // in the memstore.
    ASSIGN_OR_RETURN(trainer, CreateCudaTrainer(trainer_options, options.device_index,
                                                options.device_memory_budget_bytes, home.get(),
                                                engine::HomeTier::kNvme,
                                                options.optimizer_overlaps_backward, replica));
    if (!trainer->resident()) {
      LOG(INFO) << request.job_id() << ": the training state ("
                << engine::FormatBytes(trainer->TrainingStateBytes())
                << ") does not fit the GPU's budget: it streams through host memory, two "
                << "layers on the GPU at a time";
    }
  } else {
    if (home != nullptr && options.link_bytes_per_s > 0) {
      link = std::make_unique<engine::ThrottledTensorHome>(home.get(), options.link_bytes_per_s);
    }
    engine::OffloadOptions offload;
    ASSIGN_OR_RETURN(offload.schedule, ParameterScheduleFromProto(
                                           request.schedule(), spec.model().num_hidden_layers()));
    if (request.schedule().ops_size() > 0) {
      LOG(INFO) << request.job_id() << ": the coordinator's schedule has "
                << request.schedule().ops_size() << " ops, parameters read "
                << request.schedule().prefetch_distance() << " layer(s) ahead, predicted step "
                << request.schedule().predicted_step_time_s() << " s";
    }
    offload.device_budget_bytes = options.device_memory_budget_bytes;
    offload.optimizer_state_tier = options.optimizer_state_tier;
    offload.overlap_optimizer = options.optimizer_overlaps_backward;
    offload.home = link != nullptr ? static_cast<engine::TensorHome*>(link.get()) : home.get();
    // The optimizer runs in this process on host memory next to the memstore's tensors: it
    // does not cross the (modelled) device link.
    offload.host_home = home.get();
    offload.replica = replica;
    ASSIGN_OR_RETURN(std::unique_ptr<engine::OffloadTrainer> offload_trainer,
                     engine::OffloadTrainer::Create(trainer_options, offload));
    trainer = std::make_unique<CpuDeviceTrainer>(std::move(offload_trainer));
  }
  // Read once, so every checkpoint of the job carries the tokenizer the job started with.
  ASSIGN_OR_RETURN(std::optional<TokenizerFiles> tokenizer,
                   ReadTokenizerFiles(spec.data().path()));
  if (tokenizer.has_value() && tokenizer->info.vocab_size > spec.model().vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.vocab_size ", spec.model().vocab_size(), " is smaller than the tokenizer's ",
        tokenizer->info.vocab_size, " (", TokenizerSidecarPath(spec.data().path()), ")"));
  }
  const TokenizerFiles* tokenizer_files = tokenizer.has_value() ? &*tokenizer : nullptr;
  LOG(INFO) << request.job_id() << ": training " << spec.train().steps() << " steps on "
            << (options.device == DeviceKind::kCuda
                    ? absl::StrCat("GPU ", options.device_index)
                    : absl::StrCat("the CPU device with ", trainer_options.num_threads,
                                   " threads"))
            << "; training state "
            << trainer->TrainingStateBytes() << " bytes, device budget "
            << options.device_memory_budget_bytes << " bytes"
            << (trainer->resident() ? " (resident)" : " (offloaded through the memstore)");
  const int64_t first = trainer->step();
  if (first > spec.train().steps()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot resume from ", resume_from, ": it is step ", first,
        " of a job of train.steps = ", spec.train().steps()));
  }
  if (first > 0) {
    LOG(INFO) << request.job_id() << ": resuming from " << resume_from << ", step " << first
              << " of " << spec.train().steps();
  }
  if (world > 1) {
    LOG(INFO) << request.job_id() << ": replica " << rank << " of " << world
              << ", micro-batches " << share.first << " to " << share.first + share.count - 1
              << " of each step's " << spec.train().grad_accum_steps();
  }
  if (first == 0 && spec.checkpoint().save_initial() && reports) {
    RETURN_IF_ERROR(WriteCheckpoint(*trainer, request, tokenizer_files, 0, emit));
  }
  const int64_t every = spec.checkpoint().every_steps();
  for (int64_t step = first; step < spec.train().steps(); ++step) {
    if (cancelled()) return absl::CancelledError("cancelled");
    ASSIGN_OR_RETURN(engine::OffloadStepResult result, trainer->Step());
    TaskEvent event;
    StepRecord* record = event.mutable_step();
    record->set_step(result.step + 1);  // Steps completed, 1 for the first.

    record->set_loss(result.loss);
    record->set_lr(result.lr);
    record->set_grad_norm(result.grad_norm);
    record->set_tokens(result.tokens);
    record->set_step_time_s(result.step_time_s);
    record->set_tokens_per_s(result.step_time_s > 0 ? result.tokens / result.step_time_s : 0);
    record->set_device_memory_budget_bytes(result.device_memory_budget_bytes);
    record->set_device_memory_peak_bytes(result.device_memory_peak_bytes);
    if (result.bytes_home_to_device > 0) {
      (*record->mutable_bytes_moved())["host->device"] = result.bytes_home_to_device;
    }
    if (result.bytes_device_to_home > 0) {
      (*record->mutable_bytes_moved())["device->host"] = result.bytes_device_to_home;
    }
    record->set_compute_s(result.compute_seconds);
    record->set_device_busy_fraction(result.device_busy_fraction());
    if (!trainer->resident()) {
      (*record->mutable_stall_seconds())["optimizer"] = result.stall_optimizer_seconds;
      // Reads from the memstore are timed and counted on the CPU device; a streamed GPU job's
      // copies are not (its stalls show in the busy fraction instead).
      if (result.home_reads > 0) {
        (*record->mutable_stall_seconds())["transfer"] = result.stall_transfer_seconds;
        (*record->mutable_stall_seconds())["memory"] = result.stall_memory_seconds;
        record->set_prefetch_hit_rate(result.prefetch_hit_rate());
        record->set_read_ahead_fraction(result.read_ahead_fraction());
      }
      record->set_optimizer_overlapped(result.optimizer_overlap_kept);
    }
    record->set_time_unix_ms(absl::ToUnixMillis(absl::Now()));
    if (observe) {
      // This worker's own part of the step: a replica's share of the tokens, so the workers'
      // counters add up to the job's.
      TaskEvent own = event;
      const int64_t own_tokens = result.tokens * share.count / spec.train().grad_accum_steps();
      own.mutable_step()->set_tokens(own_tokens);
      own.mutable_step()->set_tokens_per_s(
          result.step_time_s > 0 ? own_tokens / result.step_time_s : 0);
      observe(own);
    }
    report(event);
    if (step == 0 && reports && !trainer->first_step_trace().empty()) {
      std::error_code ec;
      fs::create_directories(request.output_dir(), ec);
      const std::string path = (fs::path(request.output_dir()) / "trace-step-1.json").string();
      if (absl::Status s = WriteStepTrace(trainer->first_step_trace(), path); !s.ok()) {
        LOG(WARNING) << request.job_id() << ": " << s;
      } else {
        LOG(INFO) << request.job_id() << ": step 1 trace in " << path;
      }
    }
    const int64_t done = step + 1;
    if (reports && (done == spec.train().steps() || (every > 0 && done % every == 0))) {
      RETURN_IF_ERROR(WriteCheckpoint(*trainer, request, tokenizer_files, done, emit));
    }
  }
  return absl::OkStatus();
}

}  // namespace lumen
