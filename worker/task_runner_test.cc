#include "worker/task_runner.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "memstore/memstore_client.h"
#include "worker/cuda_jobs.h"
#include "worker/engine/offload_trainer.h"
#include "worker/memstore_collective.h"
#ifdef LUMEN_CUDA_BUILT
#include "worker/cuda/host_state.h"
#include "worker/cuda/job_trainer.h"
#endif

namespace lumen {
namespace {

using ::testing::HasSubstr;

// A memstore with fixed free space per tier.
class SizedMemstore : public FakeMemstoreClient {
 public:
  // Tiers of these capacities, partly used: admission counts capacity, not free space (the
  // coordinator counts the jobs beside).
  SizedMemstore(int64_t host_capacity, int64_t nvme_capacity) {
    TierInfo* host = stats_.add_tiers();
    host->set_name("host");
    host->set_capacity_bytes(host_capacity);
    host->set_used_bytes(host_capacity / 2);
    TierInfo* nvme = stats_.add_tiers();
    nvme->set_name("nvme:/tmp/x");
    nvme->set_capacity_bytes(nvme_capacity);
    nvme->set_used_bytes(nvme_capacity / 2);
  }
  absl::StatusOr<GetMemstoreStatsReply> GetStats(absl::Duration) override { return stats_; }

 private:
  GetMemstoreStatsReply stats_;
};

JobSpec Spec(int micro_batch) {
  JobSpec spec;
  ModelSpec* m = spec.mutable_model();
  m->set_hidden_size(64);
  m->set_intermediate_size(176);
  m->set_num_hidden_layers(4);
  m->set_num_attention_heads(4);
  m->set_num_key_value_heads(2);
  m->set_vocab_size(256);
  m->set_max_position_embeddings(64);
  m->set_rope_theta(10000);
  m->set_rms_norm_eps(1e-5);
  m->set_init_std(0.02);
  spec.mutable_optimizer()->add_betas(0.9);
  spec.mutable_optimizer()->add_betas(0.95);
  spec.mutable_train()->set_steps(1);
  spec.mutable_train()->set_seq_len(32);
  spec.mutable_train()->set_micro_batch_size(micro_batch);
  spec.mutable_train()->set_grad_accum_steps(2);
  return spec;
}

#ifdef LUMEN_CUDA_BUILT
// Admission on a CUDA device is arithmetic on the shapes: no GPU needed. A job runs resident
// when it fits the GPU, streamed through host memory when its working set does, and is refused
// with the sizes otherwise.
TEST(CudaTaskTest, AdmissionChoosesResidentOrStreamedByTheBudget) {
  TaskRunnerOptions options;
  options.device = DeviceKind::kCuda;
  JobSpec spec = Spec(1);
  spec.mutable_model()->set_hidden_size(128);  // head_dim 32
  options.device_memory_budget_bytes = int64_t{1} << 30;
  EXPECT_TRUE(CheckTask(spec, options).ok()) << CheckTask(spec, options).status();
  absl::StatusOr<engine::TrainerOptions> o = TrainerOptionsFromSpec(spec, 1);
  ASSERT_TRUE(o.ok()) << o.status();
  constexpr int64_t kWorkspace = int64_t{32} << 20;
  absl::StatusOr<int64_t> working = cuda::CudaJobTrainer::OffloadDeviceBytes(*o);
  absl::StatusOr<int64_t> host = cuda::CudaJobTrainer::OffloadHostBytes(*o);
  engine::TrainerOptions recompute = *o;
  recompute.activation_checkpointing = true;
  absl::StatusOr<int64_t> resident = cuda::CudaJobTrainer::DeviceBytes(recompute);
  ASSERT_TRUE(working.ok() && host.ok() && resident.ok());
  ASSERT_LT(*working, *resident);
  // The host holds bf16 weights, fp32 gradients, master weights and both moments at least.
  EXPECT_GE(*host, cuda::ResidentState::Bytes(o->model));
  // Streamed: the working set fits, the resident footprint does not.
  const int64_t streamed = kWorkspace + *working;
  absl::StatusOr<CudaJobMemory> m = CheckCudaTask(*o, "worker-0", streamed, *host);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->streamed);
  EXPECT_EQ(m->state_home_bytes, 0);
  EXPECT_TRUE(CheckCudaTask(*o, "worker-0", streamed, -1).ok());
  // Resident when it fits.
  m = CheckCudaTask(*o, "worker-0", int64_t{1} << 30, 0);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FALSE(m->streamed);
  // Too little host memory for the streamed state.
  const absl::Status no_host = CheckCudaTask(*o, "worker-0", streamed, *host - 1).status();
  EXPECT_EQ(no_host.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(no_host.message()), HasSubstr("of host memory"));
  EXPECT_THAT(std::string(no_host.message()), HasSubstr(engine::FormatBytes(*host)));
  EXPECT_THAT(std::string(no_host.message()), HasSubstr("--optimizer-state-tier nvme"));
  // With the master weights and moments in the memstore the host holds 12 bytes a parameter
  // less (their update buffers aside): the bf16 weights and fp32 gradients stay. The memstore
  // holds them.
  absl::StatusOr<int64_t> host_home = cuda::CudaJobTrainer::OffloadHostBytes(*o, true);
  ASSERT_TRUE(host_home.ok());
  const int64_t params = engine::ParameterCount(o->model);
  EXPECT_LT(*host_home, *host);
  EXPECT_EQ(*host - *host_home, cuda::HostTrainingState::OwnBytes(o->model, false) -
                                    cuda::HostTrainingState::OwnBytes(o->model, true));
  EXPECT_GE(*host - *host_home, 12 * params - cuda::HostTrainingState::OwnBytes(o->model, true));
  m = CheckCudaTask(*o, "worker-0", streamed, *host_home, /*state_in_memstore=*/true);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->streamed);
  EXPECT_EQ(m->state_home_bytes, cuda::HostTrainingState::HomeBytes(o->model));
  EXPECT_GE(m->state_home_bytes, 12 * params);
  EXPECT_EQ(CheckCudaTask(*o, "worker-0", streamed, *host_home - 1, true).status().code(),
            absl::StatusCode::kResourceExhausted);
  // --optimizer-overlap backward keeps a second generation of all but the embedding's master
  // weights and moments for a job that clips, in the worker or with the first in the memstore
  // (without clipping the update runs in place during the backward anyway).
  absl::StatusOr<int64_t> host_spec = cuda::CudaJobTrainer::OffloadHostBytes(*o, false, true);
  ASSERT_TRUE(host_spec.ok());
  EXPECT_GT(*host_spec, *host);
  engine::TrainerOptions clipped = *o;
  clipped.optimizer.grad_clip = 1.0;
  EXPECT_TRUE(CheckCudaTask(clipped, "worker-0", streamed, *host_spec, false, true).ok());
  const absl::Status no_spec =
      CheckCudaTask(clipped, "worker-0", streamed, *host_spec - 1, false, true).status();
  EXPECT_EQ(no_spec.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(no_spec.message()), HasSubstr("--optimizer-overlap forward"));
  m = CheckCudaTask(clipped, "worker-0", streamed, *host_home, true, true);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->state_home_bytes, cuda::HostTrainingState::HomeBytes(o->model, true));
  EXPECT_GT(m->state_home_bytes, cuda::HostTrainingState::HomeBytes(o->model));
  engine::TrainerOptions unclipped = *o;
  unclipped.optimizer.grad_clip = 0;
  EXPECT_TRUE(CheckCudaTask(unclipped, "worker-0", streamed, *host, false, true).ok());
  // Below the working set: refused, naming both footprints and the budget.
  const absl::Status s = CheckCudaTask(*o, "worker-0", streamed - 1, *host).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("of GPU memory with everything resident"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(engine::FormatBytes(*working + kWorkspace) +
                        " streamed through host memory"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("worker-0's budget is " + engine::FormatBytes(streamed - 1)));
  // The CUDA attention has kernels for head_dim 32, 64 and 128 only.
  options.device_memory_budget_bytes = int64_t{1} << 30;
  const absl::Status h = CheckTask(Spec(1), options).status();
  EXPECT_EQ(h.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(h.message()), HasSubstr("head_dim 16"));
}

// Streamed with --optimizer-state-tier nvme, the master weights and moments need room on the
// memstore's NVMe tier.
TEST(CudaTaskTest, OptimizerStateOnNvmeNeedsRoomThere) {
  TaskRunnerOptions options;
  options.device = DeviceKind::kCuda;
  JobSpec spec = Spec(1);
  spec.mutable_model()->set_hidden_size(128);
  absl::StatusOr<engine::TrainerOptions> o = TrainerOptionsFromSpec(spec, 1);
  ASSERT_TRUE(o.ok());
  absl::StatusOr<int64_t> working = cuda::CudaJobTrainer::OffloadDeviceBytes(*o);
  ASSERT_TRUE(working.ok());
  options.device_memory_budget_bytes = (int64_t{32} << 20) + *working;  // streamed
  options.optimizer_state_tier = engine::HomeTier::kNvme;
  const int64_t state = cuda::HostTrainingState::HomeBytes(o->model);
  SizedMemstore small(int64_t{1} << 30, state - 1);
  options.memstore = &small;
  const absl::Status s = CheckTask(spec, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("fp32 master weights and AdamW moments need"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("on the memstore's NVMe tier"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(engine::FormatBytes(state)));
  SizedMemstore roomy(int64_t{1} << 30, state);  // half used: capacity is what counts
  options.memstore = &roomy;
  absl::StatusOr<ResourceClaims> claims = CheckTask(spec, options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  // The claims: master weights and moments on NVMe, the bf16 weights and fp32 gradients in the
  // worker's host memory.
  EXPECT_EQ(claims->memstore_nvme_bytes(), state);
  EXPECT_EQ(claims->memstore_host_bytes(), 0);
  EXPECT_GT(claims->worker_host_bytes(), 0);
  // The host memory the coordinator says jobs may take.
  const absl::Status h = CheckTask(spec, options, claims->worker_host_bytes() - 1).status();
  EXPECT_EQ(h.code(), absl::StatusCode::kResourceExhausted) << h;
  EXPECT_THAT(std::string(h.message()), HasSubstr("of host memory"));
  EXPECT_TRUE(CheckTask(spec, options, claims->worker_host_bytes()).ok());
  // Kept in the worker, the memstore is not asked.
  options.optimizer_state_tier = engine::HomeTier::kHost;
  options.memstore = &small;
  claims = CheckTask(spec, options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  EXPECT_EQ(claims->memstore_nvme_bytes(), 0);
  EXPECT_GT(claims->worker_host_bytes(), state);
}

// The product's case (DESIGN.md): a 70B model on one RTX 4090 of a node with 512 GB of RAM.
// Streamed with its whole state in the worker it needs 18 bytes a parameter of host memory and
// is refused; with the master weights and moments in the memstore's NVMe tier the worker keeps
// 6 (bf16 weights, fp32 gradients) and the step's layer inputs, and it is admitted.
TEST(CudaTaskTest, A70BModelStreamsOnOne4090WithItsOptimizerStateOnNvme) {
  JobSpec spec = Spec(1);
  ModelSpec* m = spec.mutable_model();  // the llama3-70b preset
  m->set_hidden_size(8192);
  m->set_intermediate_size(28672);
  m->set_num_hidden_layers(80);
  m->set_num_attention_heads(64);
  m->set_num_key_value_heads(8);
  m->set_vocab_size(128256);
  m->set_max_position_embeddings(8192);
  m->set_rope_theta(500000);
  spec.mutable_train()->set_seq_len(2048);
  spec.mutable_train()->set_grad_accum_steps(16);
  absl::StatusOr<engine::TrainerOptions> o = TrainerOptionsFromSpec(spec, 1);
  ASSERT_TRUE(o.ok()) << o.status();
  const int64_t params = engine::ParameterCount(o->model);
  ASSERT_EQ(params, 70553706496);
  const int64_t gpu = int64_t{22} << 30;     // a 4090's 24 GiB less the CUDA context's
  const int64_t host = int64_t{480} * 1000 * 1000 * 1000;  // MemAvailable of a 512 GB node
  const absl::Status in_worker = CheckCudaTask(*o, "worker-0", gpu, host).status();
  EXPECT_EQ(in_worker.code(), absl::StatusCode::kResourceExhausted) << in_worker;
  EXPECT_THAT(std::string(in_worker.message()), HasSubstr("--optimizer-state-tier nvme"));
  absl::StatusOr<CudaJobMemory> on_nvme = CheckCudaTask(*o, "worker-0", gpu, host, true);
  ASSERT_TRUE(on_nvme.ok()) << on_nvme.status();
  EXPECT_TRUE(on_nvme->streamed);
  EXPECT_GE(on_nvme->state_home_bytes, 12 * params);
  EXPECT_GE(on_nvme->host_bytes, 6 * params);
  EXPECT_LE(on_nvme->host_bytes, host);
}

TEST(CudaTaskTest, RunWithoutAGpuSaysWhy) {
  if (ProbeCudaDevice(0, 0).ok()) GTEST_SKIP() << "this machine has a GPU";
  TaskRunnerOptions options;
  options.device = DeviceKind::kCuda;
  RunTaskRequest request;
  *request.mutable_spec() = Spec(1);
  request.mutable_spec()->mutable_model()->set_hidden_size(128);
  request.set_job_id("j");
  const absl::Status s =
      RunTask(request, options, [](const TaskEvent&) {}, [] { return false; });
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("no usable CUDA device"));
}
#else
TEST(CudaTaskTest, BuildWithoutCudaSaysSo) {
  TaskRunnerOptions options;
  options.device = DeviceKind::kCuda;
  const absl::Status s = CheckTask(Spec(1), options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("has no CUDA device"));
}
#endif

// A memstore that records the id of every tensor written.
class RecordingMemstore : public FakeMemstoreClient {
 public:
  absl::Status Write(const std::string& id, const void* data, int64_t size,
                     const std::string& dtype, Tier tier) override {
    {
      absl::MutexLock l(&mu_);
      ids_.push_back(id);
    }
    return FakeMemstoreClient::Write(id, data, size, dtype, tier);
  }
  std::vector<std::string> ids() {
    absl::MutexLock l(&mu_);
    return ids_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> ids_ ABSL_GUARDED_BY(mu_);
};

// An offloaded job's tensors go under its run's own prefix (what a stopped run's task writes
// late lands in its own names), and are freed when the task ends.
TEST(RunTaskTest, AnOffloadedJobsTensorsAreNamedByItsRun) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") + "/run_prefix";
  std::filesystem::create_directories(dir);
  const std::string data = dir + "/train.bin";
  {
    std::vector<uint16_t> tokens(4096);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>(i * 7 % 256);
    std::FILE* f = std::fopen(data.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(tokens.data(), 2, tokens.size(), f);
    std::fclose(f);
  }
  RecordingMemstore memstore;
  TaskRunnerOptions options;
  options.memstore = &memstore;
  options.device_memory_budget_bytes = 1 << 20;  // below the 3.4 MiB state: offloaded
  RunTaskRequest request;
  *request.mutable_spec() = Spec(1);
  request.mutable_spec()->mutable_data()->set_path(data);
  request.mutable_spec()->mutable_data()->set_token_dtype(TOKEN_DTYPE_UINT16);
  request.set_job_id("job-7");
  request.set_output_dir(dir + "/out");
  request.set_run(3);
  const absl::Status s =
      RunTask(request, options, [](const TaskEvent&) {}, [] { return false; });
  ASSERT_TRUE(s.ok()) << s;
  const std::vector<std::string> ids = memstore.ids();
  ASSERT_FALSE(ids.empty());
  for (const std::string& id : ids) EXPECT_THAT(id, ::testing::StartsWith("job-7/run3/"));
  absl::StatusOr<FreeTensorsReply> left = memstore.FreeTensors("job-7/", absl::Seconds(1));
  ASSERT_TRUE(left.ok());
  EXPECT_EQ(left->tensors(), 0);
  std::filesystem::remove_all(dir);
}

TEST(CheckTaskTest, BudgetBelowTheLargestOpNamesTheOpAndTheBytes) {
  TaskRunnerOptions options;
  options.device_memory_budget_bytes = 64 << 10;
  const absl::Status s = CheckTask(Spec(4), options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("backward of layer"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("worker-0's budget is 0.06 MiB (65536 bytes)"));
}

TEST(CheckTaskTest, ResidentJobNeedsNoMemstore) {
  TaskRunnerOptions options;
  options.device_memory_budget_bytes = int64_t{1} << 30;
  absl::StatusOr<ResourceClaims> claims = CheckTask(Spec(1), options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  EXPECT_EQ(claims->memstore_host_bytes(), 0);
  EXPECT_EQ(claims->memstore_nvme_bytes(), 0);
  // The CPU device's memory is the worker's: the training state and the largest op.
  EXPECT_GT(claims->worker_host_bytes(), 0);
  EXPECT_LT(claims->worker_host_bytes(), int64_t{64} << 20);
}

TEST(CheckTaskTest, OffloadedJobNeedsAMemstoreWithRoom) {
  TaskRunnerOptions options;
  options.device_memory_budget_bytes = 1 << 20;  // above the largest op, below the state
  absl::Status s = CheckTask(Spec(1), options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("no memstore"));

  SizedMemstore small(100 << 10, 0);
  options.memstore = &small;
  s = CheckTask(Spec(1), options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("of the memstore's host memory"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("but it holds 0.10 MiB (102400 bytes)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("--optimizer-state-tier nvme"));

  SizedMemstore roomy(int64_t{1} << 30, 0);
  options.memstore = &roomy;
  absl::StatusOr<ResourceClaims> claims = CheckTask(Spec(1), options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  // Offloaded, the job takes the whole device budget and holds its state in the memstore.
  EXPECT_EQ(claims->worker_host_bytes(), 1 << 20);
  const int64_t host_with_moments = claims->memstore_host_bytes();
  EXPECT_GT(host_with_moments, 1 << 20);
  EXPECT_EQ(claims->memstore_nvme_bytes(), 0);

  // Moments on NVMe need room there.
  options.optimizer_state_tier = engine::HomeTier::kNvme;
  s = CheckTask(Spec(1), options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("on the memstore's NVMe tier"));
  SizedMemstore with_nvme(int64_t{1} << 30, int64_t{1} << 30);
  options.memstore = &with_nvme;
  claims = CheckTask(Spec(1), options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  // m and v moved from the host tier to NVMe.
  EXPECT_GT(claims->memstore_nvme_bytes(), 0);
  EXPECT_EQ(claims->memstore_host_bytes() + claims->memstore_nvme_bytes(), host_with_moments);
}

// A job on several workers: every replica keeps the whole state resident with its share of
// the micro-batches, and exchanges its gradients through the memstore's host memory; on the
// CPU device a state too large for the device is offloaded, shared by the replicas.
TEST(CheckTaskTest, ReplicasClaimTheirStateAndExchange) {
  JobSpec spec = Spec(1);
  spec.mutable_train()->set_grad_accum_steps(4);
  spec.mutable_resources()->set_workers(2);
  TaskRunnerOptions options;
  options.device_memory_budget_bytes = int64_t{1} << 30;
  absl::Status s = CheckTask(spec, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("through the memstore"));

  SizedMemstore roomy(int64_t{1} << 30, 0);
  options.memstore = &roomy;
  absl::StatusOr<ResourceClaims> claims = CheckTask(spec, options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  absl::StatusOr<engine::TrainerOptions> o = TrainerOptionsFromSpec(spec, 1);
  ASSERT_TRUE(o.ok());
  const int64_t params = engine::ParameterCount(o->model);
  // The exchange of a step, as a reduce-scatter between 2: the half of the gradients it sends
  // and its sums of two steps, each with the loss and the step's number.
  EXPECT_EQ(claims->memstore_host_bytes(), 3 * (4 * (params / 2 + 1) + 8 + 8));
  // The state resident, with 2 of the 4 micro-batches' activations.
  JobSpec one = spec;
  one.mutable_resources()->set_workers(1);
  one.mutable_train()->set_grad_accum_steps(2);
  absl::StatusOr<ResourceClaims> alone = CheckTask(one, options);
  ASSERT_TRUE(alone.ok());
  EXPECT_EQ(claims->worker_host_bytes(), alone->worker_host_bytes());

  // Offloaded: each worker claims half of the shared parameters and moments (12 bytes a
  // parameter in fp32) and its own gradients and activation checkpoints.
  const int64_t budget = claims->worker_host_bytes() - 1;
  options.device_memory_budget_bytes = budget;
  engine::TrainerOptions share = *o;
  share.train.grad_accum_steps = 2;
  absl::StatusOr<engine::OffloadRequirements> needs =
      engine::OffloadTrainer::Requirements(share);
  ASSERT_TRUE(needs.ok());
  absl::StatusOr<ResourceClaims> offloaded = CheckTask(spec, options);
  ASSERT_TRUE(offloaded.ok()) << offloaded.status();
  EXPECT_EQ(offloaded->worker_host_bytes(), budget);
  const int64_t shared = 3 * needs->parameter_bytes;
  const int64_t own = needs->parameter_bytes + needs->activation_bytes;
  const int64_t exchange =
      MemstoreCollective::ClaimBytes(0, 16 * (o->model.num_hidden_layers + 2), 2);
  EXPECT_EQ(offloaded->memstore_host_bytes(), (shared + 1) / 2 + own + exchange);
  EXPECT_EQ(offloaded->memstore_nvme_bytes(), 0);
  // Too little host memory in the memstore for the shared state and both replicas' own.
  SizedMemstore small(shared + 2 * (own + exchange) - 1, 0);
  options.memstore = &small;
  s = CheckTask(spec, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("resources.workers: 2 replicas of an offloaded job share its parameters "
                        "and AdamW moments"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("--optimizer-state-tier nvme"));
  options.memstore = &roomy;

#ifdef LUMEN_CUDA_BUILT
  // On GPUs each replica is resident on its GPU and sums its gradients through the host: an
  // fp32 copy of them in the worker and the exchange's buffers, half of them each.
  options.device = DeviceKind::kCuda;
  spec.mutable_model()->set_hidden_size(128);  // head_dim 32, which the CUDA attention runs
  options.device_memory_budget_bytes = int64_t{1} << 30;
  absl::StatusOr<engine::TrainerOptions> g = TrainerOptionsFromSpec(spec, 1);
  ASSERT_TRUE(g.ok());
  const int64_t gpu_params = engine::ParameterCount(g->model);
  claims = CheckTask(spec, options);
  ASSERT_TRUE(claims.ok()) << claims.status();
  EXPECT_EQ(claims->worker_host_bytes(), 4 * gpu_params + 2 * 4 * (gpu_params / 2 + 1));
  EXPECT_EQ(claims->memstore_host_bytes(), 3 * (4 * (gpu_params / 2 + 1) + 8 + 8));
  // A replica the GPU could only stream is refused, naming the field.
  g->train.grad_accum_steps = 2;
  absl::StatusOr<int64_t> working = cuda::CudaJobTrainer::OffloadDeviceBytes(*g);
  ASSERT_TRUE(working.ok());
  options.device_memory_budget_bytes = (int64_t{32} << 20) + *working;
  s = CheckTask(spec, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("resources.workers: 2: each GPU keeps a whole replica"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("use resources.workers: 1 to train it streamed"));
#else
  options.device = DeviceKind::kCuda;  // a worker binary without CUDA says so
  EXPECT_EQ(CheckTask(spec, options).status().code(), absl::StatusCode::kFailedPrecondition);
#endif
}

TEST(CheckTaskTest, SpecTheEngineRefusesIsInvalid) {
  TaskRunnerOptions options;
  JobSpec spec = Spec(1);
  spec.mutable_train()->set_seq_len(128);  // > max_position_embeddings
  EXPECT_EQ(CheckTask(spec, options).status().code(), absl::StatusCode::kInvalidArgument);
}

// One decoder layer (planner layers: 0 embedding, 1 decoder, 2 head), parameters read one
// layer ahead: each prefetch waits for the release two layers back.
StepSchedule OneLayerSchedule() {
  StepSchedule s;
  auto add = [&s](ScheduleOp::Kind kind, ScheduleOp::Phase phase, int layer,
                  std::vector<int> deps) {
    ScheduleOp* op = s.add_ops();
    op->set_kind(kind);
    op->set_phase(phase);
    op->set_layer(layer);
    if (kind == ScheduleOp::PREFETCH || kind == ScheduleOp::RELEASE) op->set_tensor("params");
    for (int d : deps) op->add_deps(d);
    op->set_label(absl::StrCat(ScheduleOp::Kind_Name(kind), " ", layer));
    return s.ops_size() - 1;
  };
  const auto F = ScheduleOp::FORWARD, B = ScheduleOp::BACKWARD, N = ScheduleOp::PHASE_NONE;
  std::vector<int> releases;
  auto layer = [&](ScheduleOp::Phase phase, int l) {
    const int position = static_cast<int>(releases.size());
    std::vector<int> slot;
    if (position >= 2) slot.push_back(releases[position - 2]);
    const int p = add(ScheduleOp::PREFETCH, N, l, slot);
    const int c = add(ScheduleOp::COMPUTE, phase, l, {p});
    releases.push_back(add(ScheduleOp::RELEASE, N, l, {c}));
  };
  for (int l = 0; l <= 2; ++l) layer(F, l);
  for (int l = 2; l >= 0; --l) layer(B, l);
  add(ScheduleOp::WAIT, N, -1, releases);
  return s;
}

TEST(ParameterScheduleTest, IssuesEachReadOnceWhatItWaitsForHasRun) {
  auto p = ParameterScheduleFromProto(OneLayerSchedule(), 1);
  ASSERT_TRUE(p.ok()) << p.status();
  // Trainer ops: 0 embedding forward, 1 layer forward, 2 head, 3 layer backward, 4 embedding
  // backward. The first two reads wait for nothing; each later one for the compute op two
  // positions back: the head's second read (for its backward, which the trainer runs in the
  // same op) once the layer's forward ran, the layer's and the embedding's backward reads once
  // the head ran.
  using V = std::vector<int>;
  EXPECT_EQ(p->at_op, (std::vector<V>{V{0, 1}, V{2}, V{2}, V{1, 0}, V{}}));
  EXPECT_TRUE(ParameterScheduleFromProto(StepSchedule(), 1)->at_op.empty());
}

TEST(ParameterScheduleTest, RefusesAnOrderTheTrainerDoesNotRun) {
  StepSchedule s = OneLayerSchedule();
  // Two micro-batch groups: the layer's forward twice.
  s.mutable_ops(4)->set_layer(0);
  auto p = ParameterScheduleFromProto(s, 1);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()),
              HasSubstr("schedule op 4 (COMPUTE 1) is the forward of layer 0, but the trainer "
                        "runs the forward of layer 1 next"));
  // A model with more layers than the schedule.
  p = ParameterScheduleFromProto(OneLayerSchedule(), 2);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(std::string(p.status().message()),
              HasSubstr("but the trainer runs the forward of layer 3 next"));
}

}  // namespace
}  // namespace lumen
