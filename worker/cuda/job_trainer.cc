#include "worker/cuda/job_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/cuda/layout.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/thread_pool.h"

namespace lumen::cuda {

CudaLlamaOptions CudaJobTrainer::ModelOptions(const engine::TrainerOptions& options) {
  CudaLlamaOptions o;
  o.keep_activations = !options.activation_checkpointing;
  return o;
}

absl::StatusOr<int64_t> CudaJobTrainer::DeviceBytes(const engine::TrainerOptions& options) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  const engine::TrainConfig& t = options.train;
  ASSIGN_OR_RETURN(const int64_t trainer,
                   CudaTrainer::DeviceBytes(options.model, t.micro_batch_size, t.seq_len,
                                            ModelOptions(options)));
  const int64_t ids = 2 * t.grad_accum_steps * t.micro_batch_size * t.seq_len *
                      static_cast<int64_t>(sizeof(int32_t));
  return trainer + ids;
}

CudaOffloadOptions CudaJobTrainer::OffloadOptions(const engine::TrainerOptions& options,
                                                  const StateHome& state_home, bool speculate) {
  CudaOffloadOptions o;
  o.state_home = state_home;
  o.speculate = speculate;
  o.batch = options.train.micro_batch_size;
  o.seq = options.train.seq_len;
  o.micro_batches = options.train.grad_accum_steps;
  o.threads = options.num_threads;  // the host AdamW's
  return o;
}

absl::StatusOr<int64_t> CudaJobTrainer::OffloadDeviceBytes(const engine::TrainerOptions& options) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  return CudaOffloadTrainer::WorkingSetBytes(options.model, OffloadOptions(options));
}

absl::StatusOr<int64_t> CudaJobTrainer::OffloadHostBytes(const engine::TrainerOptions& options,
                                                         bool state_at_home, bool speculate) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  // Plus the fp32 copies the job makes next to the trainer's state, a tensor group at a time:
  // a group's initial weights while it starts, both moments of a group while it writes or
  // reads a checkpoint.
  int64_t largest_group = 0;
  for (const TensorGroupShape& g : TensorGroupShapes(options.model)) {
    largest_group = std::max(largest_group, g.elems);
  }
  return CudaOffloadTrainer::HostBytes(options.model, OffloadOptions(options, {}, speculate),
                                       state_at_home) +
         8 * largest_group;
}

absl::StatusOr<std::unique_ptr<CudaJobTrainer>> CudaJobTrainer::Create(
    const engine::TrainerOptions& options, CudaDevice* device, bool offload,
    const StateHome& state_home, bool speculate, const engine::ReplicaOptions& replica) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  const engine::TrainConfig& t = options.train;
  if (replica.collective != nullptr && offload) {
    return absl::FailedPreconditionError(
        "data parallelism on GPUs keeps each replica's training state on its GPU; a job "
        "streamed through host memory runs on one worker");
  }
  std::unique_ptr<CudaJobTrainer> job(new CudaJobTrainer(options));
  job->replica_ = replica;
  ASSIGN_OR_RETURN(job->data_, engine::TokenDataset::Open(options.data, t.seq_len,
                                                          options.model.vocab_size));
  engine::ThreadPool pool(options.num_threads);
  engine::ModelParams params;  // resident: whole (the GPU holds it anyway)
  std::unique_ptr<engine::WeightsSource> weights;  // streamed: read a group at a time
  if (offload && !options.init_from.empty()) {
    ASSIGN_OR_RETURN(weights, engine::WeightsReader::Open(options.init_from, options.model));
  } else if (offload) {
    weights = std::make_unique<engine::RandomWeights>(options.model, t.seed, &pool);
  } else if (!options.init_from.empty()) {
    params = engine::AllocateParams<float>(options.model);
    RETURN_IF_ERROR(engine::LoadWeights(options.init_from, options.model, &params));
  } else {
    engine::InitParams(options.model, t.seed, &params, &pool);
  }
  if (offload) {
    ASSIGN_OR_RETURN(job->offload_,
                     CudaOffloadTrainer::Create(device, options.model,
                                                OffloadOptions(options, state_home, speculate)));
    // A resume sets the moments next: not zeroed first.
    RETURN_IF_ERROR(
        job->offload_->SetParams(*weights, /*zero_moments=*/options.optimizer_state_from.empty()));
  } else {
    ASSIGN_OR_RETURN(job->trainer_, CudaTrainer::Create(device, options.model,
                                                        t.micro_batch_size, t.seq_len,
                                                        ModelOptions(options)));
    RETURN_IF_ERROR(job->trainer_->state().Upload(params));
    job->trainer_->SetReplica(replica);
  }
  const int64_t n = t.grad_accum_steps * t.micro_batch_size * t.seq_len;
  job->inputs_.resize(n);
  job->targets_.resize(n);
  if (!options.optimizer_state_from.empty()) {
    RETURN_IF_ERROR(job->LoadOptimizerState(options.optimizer_state_from));
  }
  return job;
}

absl::StatusOr<engine::StepResult> CudaJobTrainer::Step() {
  const auto start = std::chrono::steady_clock::now();
  const engine::TrainConfig& t = options_.train;
  const int64_t A = t.grad_accum_steps, B = t.micro_batch_size, T = t.seq_len;
  // A replica reads its share of the step's micro-batches (offset 0 of A when alone).
  const int64_t global = replica_.collective != nullptr && replica_.global_micro_batches > 0
                             ? replica_.global_micro_batches
                             : A;
  const int64_t first = replica_.collective != nullptr ? replica_.micro_batch_offset : 0;
  if (next_step_ == step_) {  // read as the previous step's next batch
    std::swap(inputs_, next_inputs_);
    std::swap(targets_, next_targets_);
  } else {
    for (int64_t a = 0; a < A; ++a) {
      RETURN_IF_ERROR(data_->ReadBatch(step_, first + a, global, B, inputs_.data() + a * B * T,
                                       targets_.data() + a * B * T));
    }
  }
  next_step_ = -1;
  const double lr = engine::LearningRate(options_.optimizer, step_, t.steps);
  // CudaTrainer applies the weight decay to matrices only, as AdamWHyperFor does by rank.
  const engine::AdamWHyper hyper = engine::AdamWHyperFor(options_.optimizer, lr, 2);
  // Offloaded, the next step's inputs too: the embedding rows they need are updated first.
  if (offload_ != nullptr) {
    next_inputs_.clear();
    if (step_ + 1 < t.steps) {
      next_inputs_.resize(inputs_.size());
      next_targets_.resize(targets_.size());
      for (int64_t a = 0; a < A; ++a) {
        RETURN_IF_ERROR(data_->ReadBatch(step_ + 1, a, A, B, next_inputs_.data() + a * B * T,
                                         next_targets_.data() + a * B * T));
      }
      next_step_ = step_ + 1;
    }
  }
  const auto device_start = std::chrono::steady_clock::now();
  absl::StatusOr<CudaStepResult> r;
  if (offload_ != nullptr) {
    absl::StatusOr<CudaOffloadStepResult> o = offload_->Step(
        inputs_, targets_, next_inputs_, hyper, options_.optimizer.grad_clip, step_ + 1);
    if (o.ok()) {
      last_ = *o;
      r = CudaStepResult{o->loss, o->grad_norm};
    } else {
      r = o.status();
    }
  } else {
    r = trainer_->Step(inputs_, targets_, A, hyper, options_.optimizer.grad_clip, step_ + 1);
  }
  const auto end = std::chrono::steady_clock::now();
  if (!r.ok()) {
    if (absl::IsFailedPrecondition(r.status())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "step ", step_, ": ", r.status().message(),
          "; training diverged or the weights hold non-finite values. Lower optimizer.lr, set "
          "optimizer.grad_clip or check init_from"));
    }
    return r.status();
  }
  engine::StepResult out;
  out.step = step_;
  out.loss = r->loss;
  out.lr = lr;
  out.grad_norm = r->grad_norm;
  out.tokens = global * B * T;
  out.step_time_s = std::chrono::duration<double>(end - start).count();
  last_device_seconds_ = std::chrono::duration<double>(end - device_start).count();
  ++step_;
  return out;
}

absl::Status CudaJobTrainer::GetParams(engine::ModelParams* out) {
  if (offload_ != nullptr) return offload_->GetParams(out);
  return trainer_->state().DownloadParams(out);
}

absl::Status CudaJobTrainer::Export(const std::string& dir) {
  if (offload_ == nullptr) {
    // Resident: the state fits the GPU, so one host copy of it at a time (the weights, then
    // the moments) is no more than the GPU's memory.
    {
      engine::ModelParams params;
      RETURN_IF_ERROR(GetParams(&params));
      RETURN_IF_ERROR(engine::ExportHfDirectory(dir, options_.model, params));
    }
    engine::ModelParams m, v;
    RETURN_IF_ERROR(trainer_->state().DownloadMoments(&m, &v));
    return engine::SaveOptimizerState(dir + "/" + engine::kOptimizerFile, options_.model, m, v,
                                      step_);
  }
  // Streamed: the state fills much of host memory (or lives in the memstore), so
  // the files are written a tensor group (one layer) at a time.
  const std::map<std::string, size_t> group_of = TensorGroupOf(options_.model);
  auto from = [this, &group_of](int which) {
    auto cached = std::make_shared<std::pair<size_t, engine::ModelParams>>();
    cached->first = SIZE_MAX;
    return engine::TensorSource(
        [this, &group_of, which, cached](const std::string& name, float* dst) -> absl::Status {
          const size_t g = group_of.at(name);
          if (cached->first != g) {
            cached->second = engine::ModelParams();  // drop the previous group
            RETURN_IF_ERROR(offload_->GetGroup(which, g, &cached->second));
            cached->first = g;
          }
          for (engine::NamedTensor<float>& t :
               engine::NamedTensors(options_.model, &cached->second)) {
            if (t.name == name) {
              std::copy(t.data->begin(), t.data->end(), dst);
              return absl::OkStatus();
            }
          }
          return absl::InternalError(absl::StrCat("export: no tensor ", name));
        });
  };
  RETURN_IF_ERROR(engine::ExportHfDirectory(dir, options_.model, from(0)));
  return engine::SaveOptimizerState(dir + "/" + engine::kOptimizerFile, options_.model, from(1),
                                    from(2), step_);
}

absl::Status CudaJobTrainer::LoadOptimizerState(const std::string& path) {
  if (offload_ == nullptr) {
    engine::ModelParams m, v;
    int64_t step = 0;
    RETURN_IF_ERROR(engine::LoadOptimizerState(path, options_.model, &m, &v, &step));
    RETURN_IF_ERROR(trainer_->state().UploadMoments(m, v));
    step_ = step;
    return absl::OkStatus();
  }
  // Streamed: a tensor group at a time, as Export writes them.
  ASSIGN_OR_RETURN(std::unique_ptr<engine::OptimizerStateReader> reader,
                   engine::OptimizerStateReader::Open(path, options_.model));
  const std::map<std::string, size_t> group_of = TensorGroupOf(options_.model);
  size_t groups = 0;
  for (const auto& [name, g] : group_of) groups = std::max(groups, g + 1);
  for (size_t g = 0; g < groups; ++g) {
    engine::ModelParams m, v;
    m.layers.resize(options_.model.num_hidden_layers);
    v.layers.resize(options_.model.num_hidden_layers);
    std::vector<engine::NamedTensor<float>> ms = engine::NamedTensors(options_.model, &m);
    std::vector<engine::NamedTensor<float>> vs = engine::NamedTensors(options_.model, &v);
    for (size_t i = 0; i < ms.size(); ++i) {
      if (group_of.at(ms[i].name) != g) continue;
      int64_t n = 1;
      for (int64_t d : ms[i].shape) n *= d;
      ms[i].data->resize(n);
      vs[i].data->resize(n);
      RETURN_IF_ERROR(reader->Read(ms[i].name, ms[i].data->data(), vs[i].data->data()));
    }
    RETURN_IF_ERROR(offload_->SetMomentsGroup(g, m, v));
  }
  step_ = reader->step();
  return absl::OkStatus();
}

}  // namespace lumen::cuda
