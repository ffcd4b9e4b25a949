#include "worker/cuda/trainer.h"

#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/kernels.h"
#include "worker/engine/kernels.h"

namespace lumen::cuda {

int64_t ResidentState::Bytes(const engine::ModelConfig& c) {
  int64_t total = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(c)) total += s.elems * (2 + 4 * 4);
  return total;
}

absl::StatusOr<std::unique_ptr<ResidentState>> ResidentState::Create(
    CudaDevice* device, const engine::ModelConfig& config) {
  RETURN_IF_ERROR(engine::CheckModelConfig(config));
  std::unique_ptr<ResidentState> s(new ResidentState(device, config));
  const std::vector<TensorGroupShape> shapes = TensorGroupShapes(config);
  for (size_t g = 0; g < shapes.size(); ++g) {
    DeviceTensorGroup grp;
    grp.elems = shapes[g].elems;
    grp.segments = shapes[g].segments;
    const std::string what = absl::StrCat("resident state: group ", g, " (", grp.elems,
                                          " elements) ");
    ASSIGN_OR_RETURN(grp.param, device->Allocate(2 * grp.elems, what + "bf16 parameters"));
    ASSIGN_OR_RETURN(grp.master, device->Allocate(4 * grp.elems, what + "master weights"));
    ASSIGN_OR_RETURN(grp.grad, device->Allocate(4 * grp.elems, what + "gradients"));
    ASSIGN_OR_RETURN(grp.m, device->Allocate(4 * grp.elems, what + "AdamW m"));
    ASSIGN_OR_RETURN(grp.v, device->Allocate(4 * grp.elems, what + "AdamW v"));
    s->groups_.push_back(std::move(grp));
  }
  ASSIGN_OR_RETURN(s->norm_acc_, device->Allocate(sizeof(double), "resident state: norm"));
  return s;
}

absl::Status ResidentState::UploadF32(const engine::ModelParams& in,
                                     DeviceBuffer DeviceTensorGroup::*which) {
  RETURN_IF_ERROR(device_->MakeCurrent("upload"));
  cudaStream_t st = device_->compute_stream();
  for (size_t g = 0; g < groups_.size(); ++g) {
    DeviceTensorGroup& grp = groups_[g];
    std::vector<float> staging(grp.elems, 0.0f);
    RETURN_IF_ERROR(CopyGroupTensors(config_, const_cast<engine::ModelParams*>(&in), g,
                                     staging.data(), /*to_flat=*/true));
    const std::string op = absl::StrCat("upload group ", g);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync((grp.*which).get(), staging.data(), 4 * grp.elems,
                                         cudaMemcpyHostToDevice, st),
                         op);
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), op);  // staging goes out of scope
  }
  return absl::OkStatus();
}

absl::Status ResidentState::Upload(const engine::ModelParams& params) {
  RETURN_IF_ERROR(UploadF32(params, &DeviceTensorGroup::master));
  cudaStream_t st = device_->compute_stream();
  for (size_t g = 0; g < groups_.size(); ++g) {
    DeviceTensorGroup& grp = groups_[g];
    const std::string op = absl::StrCat("upload group ", g);
    RETURN_IF_ERROR(kernels::F32ToBf16(grp.master.as<float>(), grp.elems, grp.param.as<bf16>(), st));
    for (DeviceBuffer* b : {&grp.grad, &grp.m, &grp.v}) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b->get(), 0, 4 * grp.elems, st), op);
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "upload parameters");
  return absl::OkStatus();
}

absl::Status ResidentState::UploadMoments(const engine::ModelParams& m,
                                          const engine::ModelParams& v) {
  RETURN_IF_ERROR(UploadF32(m, &DeviceTensorGroup::m));
  return UploadF32(v, &DeviceTensorGroup::v);
}

absl::Status ResidentState::InitRandom(uint64_t seed) {
  cudaStream_t st = device_->compute_stream();
  const float stddev = static_cast<float>(config_.init_std);
  for (size_t g = 0; g < groups_.size(); ++g) {
    DeviceTensorGroup& grp = groups_[g];
    const std::string op = absl::StrCat("initialise group ", g);
    for (DeviceBuffer* b : {&grp.master, &grp.grad, &grp.m, &grp.v}) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b->get(), 0, 4 * grp.elems, st), op);
    }
    for (const GroupSegment& seg : grp.segments) {
      float* p = grp.master.as<float>() + seg.offset;
      if (seg.matrix) {
        RETURN_IF_ERROR(kernels::FillNormal(
            p, seg.size, (seed * 1000003 + g) * 1000003 + seg.offset, stddev, st));
      } else {
        RETURN_IF_ERROR(kernels::Fill(p, seg.size, 1.0f, st));
      }
    }
    RETURN_IF_ERROR(kernels::F32ToBf16(grp.master.as<float>(), grp.elems, grp.param.as<bf16>(), st));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "initialise parameters");
  return absl::OkStatus();
}

absl::Status ResidentState::Download(DeviceBuffer DeviceTensorGroup::*which,
                                    engine::ModelParams* out) {
  RETURN_IF_ERROR(device_->MakeCurrent("download"));
  if (out->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    *out = engine::AllocateParams<float>(config_);
  }
  cudaStream_t st = device_->compute_stream();
  for (size_t g = 0; g < groups_.size(); ++g) {
    DeviceTensorGroup& grp = groups_[g];
    std::vector<float> staging(grp.elems);
    const std::string op = absl::StrCat("download group ", g);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging.data(), (grp.*which).get(), 4 * grp.elems,
                                         cudaMemcpyDeviceToHost, st),
                         op);
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), op);
    RETURN_IF_ERROR(CopyGroupTensors(config_, out, g, staging.data(), /*to_flat=*/false));
  }
  return absl::OkStatus();
}

absl::Status ResidentState::DownloadParams(engine::ModelParams* out) {
  return Download(&DeviceTensorGroup::master, out);
}

absl::Status ResidentState::DownloadGrads(engine::ModelParams* out) {
  return Download(&DeviceTensorGroup::grad, out);
}

absl::Status ResidentState::DownloadMoments(engine::ModelParams* m, engine::ModelParams* v) {
  RETURN_IF_ERROR(Download(&DeviceTensorGroup::m, m));
  return Download(&DeviceTensorGroup::v, v);
}

absl::Status ResidentState::ZeroGrads() {
  for (DeviceTensorGroup& grp : groups_) {
    CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(grp.grad.get(), 0, 4 * grp.elems, device_->compute_stream()),
        "zero gradients");
  }
  return absl::OkStatus();
}

void ResidentState::Bind(CudaLlama* model) {
  const int64_t L = config_.num_hidden_layers;
  for (int64_t l = 0; l < L; ++l) {
    model->BindLayer(static_cast<int>(l),
                     LayerView{groups_[l].param.as<bf16>(), groups_[l].grad.as<float>()});
  }
  model->BindEmbedding(groups_[L].param.as<bf16>(), groups_[L].grad.as<float>());
  DeviceTensorGroup* head = config_.tie_word_embeddings ? nullptr : &groups_[L + 2];
  model->BindHead(groups_[L + 1].param.as<bf16>(), groups_[L + 1].grad.as<float>(),
                  head ? head->param.as<bf16>() : nullptr, head ? head->grad.as<float>() : nullptr);
}

absl::StatusOr<double> ResidentState::GradNorm() {
  cudaStream_t st = device_->compute_stream();
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(norm_acc_.get(), 0, sizeof(double), st), "gradient norm");
  for (DeviceTensorGroup& grp : groups_) {
    RETURN_IF_ERROR(kernels::SumSquares(grp.grad.as<float>(), grp.elems, norm_acc_.as<double>(), st));
  }
  double total = 0;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&total, norm_acc_.get(), sizeof(double),
                                       cudaMemcpyDeviceToHost, st),
                       "gradient norm");
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "gradient norm");
  return std::sqrt(total);
}

absl::StatusOr<double> ResidentState::SumGradsAcrossReplicas(engine::Collective* collective,
                                                             int64_t step, double* loss_sum) {
  cudaStream_t st = device_->compute_stream();
  int64_t total = 0;
  for (const DeviceTensorGroup& grp : groups_) total += grp.elems;
  if (replica_grads_.bytes() != 4 * total) {
    ASSIGN_OR_RETURN(replica_grads_,
                     device_->AllocatePinned(4 * total, "data parallel: host gradients"));
  }
  const absl::Span<float> flat(replica_grads_.as<float>(), total);
  int64_t at = 0;
  for (DeviceTensorGroup& grp : groups_) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(flat.data() + at, grp.grad.get(), grp.elems * 4,
                                         cudaMemcpyDeviceToHost, st),
                         "data parallel: gradients to the host");
    at += grp.elems;
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "data parallel: gradients to the host");
  std::vector<double> scalars = {*loss_sum};
  RETURN_IF_ERROR(collective->SumAcrossReplicas(step, flat, &scalars));
  *loss_sum = scalars[0];
  at = 0;
  for (DeviceTensorGroup& grp : groups_) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grp.grad.get(), flat.data() + at, grp.elems * 4,
                                         cudaMemcpyHostToDevice, st),
                         "data parallel: summed gradients to the device");
    at += grp.elems;
  }
  // The norm of the summed gradients on the host, in a fixed order, while they upload: the
  // device's reduction adds in no fixed order, and every replica must clip alike.
  const float* g = flat.data();
  const double sq = engine::kernels::LaneSum(
      total, [g](int64_t j) { return static_cast<double>(g[j]) * g[j]; });
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "data parallel: summed gradients to the device");
  return std::sqrt(sq);
}

absl::Status ResidentState::AdamWStep(const engine::AdamWHyper& hyper, int64_t step,
                                      double grad_scale) {
  cudaStream_t st = device_->compute_stream();
  for (DeviceTensorGroup& grp : groups_) {
    for (const GroupSegment& seg : grp.segments) {
      const kernels::AdamWScalars s = kernels::MakeAdamWScalars(
          hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, seg.matrix ? hyper.weight_decay : 0.0,
          step, grad_scale);
      RETURN_IF_ERROR(kernels::AdamW(grp.master.as<float>() + seg.offset,
                                     grp.grad.as<float>() + seg.offset,
                                     grp.m.as<float>() + seg.offset,
                                     grp.v.as<float>() + seg.offset,
                                     grp.param.as<bf16>() + seg.offset, seg.size, s, st));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaTrainer>> CudaTrainer::Create(
    CudaDevice* device, const engine::ModelConfig& config, int64_t batch, int64_t seq,
    const CudaLlamaOptions& options) {
  std::unique_ptr<CudaTrainer> t(new CudaTrainer());
  t->device_ = device;
  t->batch_ = batch;
  t->seq_ = seq;
  ASSIGN_OR_RETURN(t->model_, CudaLlama::Create(device, config, options));
  ASSIGN_OR_RETURN(t->state_, ResidentState::Create(device, config));
  t->state_->Bind(t->model_.get());
  const int64_t n = batch * seq, h = config.hidden_size;
  ASSIGN_OR_RETURN(t->checkpoints_,
                   device->Allocate(2 * (config.num_hidden_layers + 1) * n * h,
                                    "activation checkpoints"));
  ASSIGN_OR_RETURN(t->dx_a_, device->Allocate(2 * n * h, "activation gradient"));
  ASSIGN_OR_RETURN(t->dx_b_, device->Allocate(2 * n * h, "activation gradient"));
  ASSIGN_OR_RETURN(t->loss_sum_, device->Allocate(sizeof(double), "loss sum"));
  RETURN_IF_ERROR(t->model_->EnsureScratch(batch, seq));
  return t;
}

absl::StatusOr<int64_t> CudaTrainer::DeviceBytes(const engine::ModelConfig& config,
                                                  int64_t batch, int64_t seq,
                                                  const CudaLlamaOptions& options) {
  // The scratch sizes depend on the shapes only; no device is touched.
  ASSIGN_OR_RETURN(std::unique_ptr<CudaLlama> model, CudaLlama::Create(nullptr, config, options));
  const int64_t n = batch * seq, h = config.hidden_size;
  auto rounded = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };  // as Allocate does
  // State (5 buffers a group, and the norm accumulator), checkpoints, two activation
  // gradients, the loss sum, then the scratch (whose formulas already allow for rounding).
  return ResidentState::Bytes(config) + 5 * 256 * static_cast<int64_t>(TensorGroupShapes(config).size()) +
         rounded(sizeof(double)) + rounded(2 * (config.num_hidden_layers + 1) * n * h) +
         2 * rounded(2 * n * h) + rounded(sizeof(double)) + model->LayerScratchBytes(batch, seq) +
         model->HeadScratchBytes(batch, seq);
}

absl::Status CudaTrainer::RunMicroBatch(const int32_t* inputs, const int32_t* targets,
                                        float grad_scale) {
  CudaLlama& m = *model_;
  const int64_t n = batch_ * seq_, h = m.config().hidden_size;
  const int L = static_cast<int>(m.config().num_hidden_layers);
  bf16* ck = checkpoints_.as<bf16>();
  RETURN_IF_ERROR(m.EmbedForward(inputs, batch_, seq_, ck));
  for (int l = 0; l < L; ++l) {
    RETURN_IF_ERROR(m.DecoderLayerForward(l, ck + l * n * h, ck + (l + 1) * n * h, batch_, seq_));
  }
  bf16* dy = dx_a_.as<bf16>();
  bf16* dx = dx_b_.as<bf16>();
  RETURN_IF_ERROR(m.HeadForwardBackward(ck + L * n * h, targets, batch_, seq_, grad_scale, dy,
                                        loss_sum_.as<double>()));
  for (int l = L - 1; l >= 0; --l) {
    RETURN_IF_ERROR(m.DecoderLayerBackward(l, ck + l * n * h, dy, dx, batch_, seq_));
    std::swap(dy, dx);
  }
  return m.EmbedBackward(inputs, batch_, seq_, dy);
}

absl::Status CheckTokenIds(const std::vector<int32_t>& ids, int64_t vocab, const char* what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i, "] = ", ids[i],
                                                     " is outside [0, vocab_size ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CudaStepResult> CudaTrainer::Step(const std::vector<int32_t>& inputs,
                                                 const std::vector<int32_t>& targets,
                                                 int64_t micro_batches,
                                                 const engine::AdamWHyper& hyper,
                                                 double max_grad_norm, int64_t step) {
  RETURN_IF_ERROR(device_->MakeCurrent("step"));
  const int64_t n = batch_ * seq_, total = micro_batches * n;
  if (micro_batches <= 0 || static_cast<int64_t>(inputs.size()) != total ||
      static_cast<int64_t>(targets.size()) != total) {
    return absl::InvalidArgumentError(absl::StrCat("step: want ", micro_batches, " x ", n,
                                                   " ids, got ", inputs.size(), " inputs and ",
                                                   targets.size(), " targets"));
  }
  const int64_t vocab = model_->config().vocab_size;
  RETURN_IF_ERROR(CheckTokenIds(inputs, vocab, "inputs"));
  RETURN_IF_ERROR(CheckTokenIds(targets, vocab, "targets"));
  cudaStream_t st = device_->compute_stream();
  const int64_t id_bytes = 2 * total * static_cast<int64_t>(sizeof(int32_t));
  if (ids_.bytes() < id_bytes) {
    ids_.Reset();
    ASSIGN_OR_RETURN(ids_, device_->Allocate(id_bytes, "token ids"));
  }
  if (ids_host_.bytes() < id_bytes) {
    ASSIGN_OR_RETURN(ids_host_, device_->AllocatePinned(id_bytes, "token ids"));
  }
  // The pinned staging may still feed the upload of a step that failed after queuing it.
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "step: wait for the previous upload");
  std::memcpy(ids_host_.get(), inputs.data(), 4 * total);
  std::memcpy(ids_host_.as<int32_t>() + total, targets.data(), 4 * total);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.get(), ids_host_.get(), id_bytes,
                                       cudaMemcpyHostToDevice, st),
                       "upload token ids");
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(loss_sum_.get(), 0, sizeof(double), st), "step");
  RETURN_IF_ERROR(state_->ZeroGrads());
  const int32_t* d_in = ids_.as<int32_t>();
  const int32_t* d_tg = d_in + total;
  // A replica's micro-batches are a part of the step's.
  const bool replicated = replica_.collective != nullptr;
  const int64_t global = replicated && replica_.global_micro_batches > 0
                             ? replica_.global_micro_batches
                             : micro_batches;
  const float scale = static_cast<float>(1.0 / static_cast<double>(global));
  for (int64_t a = 0; a < micro_batches; ++a) {
    RETURN_IF_ERROR(RunMicroBatch(d_in + a * n, d_tg + a * n, scale));
  }
  double loss_sum = 0;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&loss_sum, loss_sum_.get(), sizeof(double),
                                       cudaMemcpyDeviceToHost, st),
                       "read loss");
  double norm = 0;
  if (replicated) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "read loss");
    ASSIGN_OR_RETURN(norm, state_->SumGradsAcrossReplicas(replica_.collective, step - 1,
                                                          &loss_sum));
  } else {
    ASSIGN_OR_RETURN(norm, state_->GradNorm());  // synchronises
  }
  CudaStepResult r;
  r.loss = loss_sum / static_cast<double>(global * n);
  r.grad_norm = norm;
  if (!std::isfinite(r.loss) || !std::isfinite(norm)) {
    return absl::FailedPreconditionError(absl::StrCat("loss ", r.loss, ", gradient norm ", norm,
                                                      " (update ", step,
                                                      " not applied: parameters and moments "
                                                      "unchanged)"));
  }
  double grad_scale = 1.0;
  if (max_grad_norm > 0) {
    const double coef = max_grad_norm / (norm + 1e-6);
    if (coef < 1.0) grad_scale = static_cast<float>(coef);
  }
  RETURN_IF_ERROR(state_->AdamWStep(hyper, step, grad_scale));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), absl::StrCat("step ", step));
  return r;
}

absl::StatusOr<double> CudaTrainer::ForwardBackward(const int32_t* inputs,
                                                    const int32_t* targets, float grad_scale) {
  RETURN_IF_ERROR(device_->MakeCurrent("forward-backward"));
  const int64_t n = batch_ * seq_;
  std::vector<int32_t> in(inputs, inputs + n), tg(targets, targets + n);
  const int64_t vocab = model_->config().vocab_size;
  RETURN_IF_ERROR(CheckTokenIds(in, vocab, "inputs"));
  RETURN_IF_ERROR(CheckTokenIds(tg, vocab, "targets"));
  cudaStream_t st = device_->compute_stream();
  if (ids_.bytes() < 8 * n) {
    ids_.Reset();
    ASSIGN_OR_RETURN(ids_, device_->Allocate(8 * n, "token ids"));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.get(), in.data(), 4 * n, cudaMemcpyHostToDevice, st),
                       "upload token ids");
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.as<int32_t>() + n, tg.data(), 4 * n,
                                       cudaMemcpyHostToDevice, st),
                       "upload token ids");
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(loss_sum_.get(), 0, sizeof(double), st), "forward");
  RETURN_IF_ERROR(RunMicroBatch(ids_.as<int32_t>(), ids_.as<int32_t>() + n, grad_scale));
  double loss_sum = 0;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&loss_sum, loss_sum_.get(), sizeof(double),
                                       cudaMemcpyDeviceToHost, st),
                       "read loss");
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st), "forward-backward");
  return loss_sum / static_cast<double>(n);
}

}  // namespace lumen::cuda
