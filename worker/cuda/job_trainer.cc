#include "worker/cuda/job_trainer.h"

#include <chrono>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
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
                                                  const MomentsHome& moments, bool speculate) {
  CudaOffloadOptions o;
  o.moments = moments;
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
                                                         bool moments_at_home, bool speculate) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  // Plus the fp32 copies the job makes next to the trainer's state: the initial weights while
  // it starts, both moments while it writes a checkpoint.
  return CudaOffloadTrainer::HostBytes(options.model, OffloadOptions(options, {}, speculate),
                                       moments_at_home) +
         8 * engine::ParameterCount(options.model);
}

absl::StatusOr<std::unique_ptr<CudaJobTrainer>> CudaJobTrainer::Create(
    const engine::TrainerOptions& options, CudaDevice* device, bool offload,
    const MomentsHome& moments, bool speculate) {
  RETURN_IF_ERROR(engine::ValidateTrainerOptions(options));
  const engine::TrainConfig& t = options.train;
  std::unique_ptr<CudaJobTrainer> job(new CudaJobTrainer(options));
  ASSIGN_OR_RETURN(job->data_, engine::TokenDataset::Open(options.data, t.seq_len,
                                                          options.model.vocab_size));
  engine::ModelParams params;
  if (!options.init_from.empty()) {
    params = engine::AllocateParams<float>(options.model);
    RETURN_IF_ERROR(engine::LoadWeights(options.init_from, options.model, &params));
  } else {
    engine::ThreadPool pool(options.num_threads);
    engine::InitParams(options.model, t.seed, &params, &pool);
  }
  if (offload) {
    ASSIGN_OR_RETURN(job->offload_,
                     CudaOffloadTrainer::Create(device, options.model,
                                                OffloadOptions(options, moments, speculate)));
    RETURN_IF_ERROR(job->offload_->SetParams(params));
  } else {
    ASSIGN_OR_RETURN(job->trainer_, CudaTrainer::Create(device, options.model,
                                                        t.micro_batch_size, t.seq_len,
                                                        ModelOptions(options)));
    RETURN_IF_ERROR(job->trainer_->state().Upload(params));
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
  if (next_step_ == step_) {  // read as the previous step's next batch
    std::swap(inputs_, next_inputs_);
    std::swap(targets_, next_targets_);
  } else {
    for (int64_t a = 0; a < A; ++a) {
      RETURN_IF_ERROR(data_->ReadBatch(step_, a, A, B, inputs_.data() + a * B * T,
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
  out.tokens = A * B * T;
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
  // One host copy at a time: the weights, then the moments (a streamed job's state already
  // fills much of host memory).
  {
    engine::ModelParams params;
    RETURN_IF_ERROR(GetParams(&params));
    RETURN_IF_ERROR(engine::ExportHfDirectory(dir, options_.model, params));
  }
  engine::ModelParams m, v;
  if (offload_ != nullptr) {
    RETURN_IF_ERROR(offload_->GetMoments(&m, &v));
  } else {
    RETURN_IF_ERROR(trainer_->state().DownloadMoments(&m, &v));
  }
  return engine::SaveOptimizerState(dir + "/" + engine::kOptimizerFile, options_.model, m, v,
                                    step_);
}

absl::Status CudaJobTrainer::LoadOptimizerState(const std::string& path) {
  engine::ModelParams m = engine::AllocateParams<float>(options_.model);
  engine::ModelParams v = engine::AllocateParams<float>(options_.model);
  int64_t step = 0;
  RETURN_IF_ERROR(engine::LoadOptimizerState(path, options_.model, &m, &v, &step));
  if (offload_ != nullptr) {
    RETURN_IF_ERROR(offload_->SetMoments(m, v));
  } else {
    RETURN_IF_ERROR(trainer_->state().UploadMoments(m, v));
  }
  step_ = step;
  return absl::OkStatus();
}

}  // namespace lumen::cuda
