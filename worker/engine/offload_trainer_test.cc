#include "worker/engine/offload_trainer.h"

#include <algorithm>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/test_util.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

std::string FileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// 16 thin layers: parameters dominate a layer's working set, so the training state is many
// times the least budget that can run a step.
TrainerOptions DeepOptions(bool tied) {
  TrainerOptions o;
  o.model.hidden_size = 64;
  o.model.intermediate_size = 128;
  o.model.num_hidden_layers = 16;
  o.model.num_attention_heads = 4;
  o.model.num_key_value_heads = 2;
  o.model.vocab_size = 128;
  o.model.max_position_embeddings = 16;
  o.model.tie_word_embeddings = tied;
  o.model.init_std = 0.05;
  o.optimizer.lr = 3e-3;
  o.optimizer.warmup_steps = 1;
  o.optimizer.min_lr = 3e-4;
  o.optimizer.weight_decay = 0.1;
  // Small enough that every step clips.
  o.optimizer.grad_clip = 0.5;
  o.train.steps = 4;
  o.train.seq_len = 8;
  o.train.micro_batch_size = 1;
  o.train.grad_accum_steps = 2;
  o.train.seed = 9;
  o.data.path = WriteTokens(tied ? "deep_tied.bin" : "deep.bin", 4000, 128);
  o.num_threads = 2;
  return o;
}

OffloadOptions Resident() {
  OffloadOptions off;
  off.device_budget_bytes = int64_t{1} << 30;
  return off;
}

struct TrainRun {
  std::vector<OffloadStepResult> steps;
  ModelParams params, m, v;
};

TrainRun Train(OffloadTrainer* t, int n) {
  TrainRun r;
  for (int i = 0; i < n; ++i) {
    auto s = t->Step();
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return r;
    r.steps.push_back(*s);
  }
  auto p = t->GatherParams();
  EXPECT_TRUE(p.ok()) << p.status();
  if (p.ok()) r.params = *std::move(p);
  EXPECT_TRUE(t->GatherOptimizerState(&r.m, &r.v).ok());
  return r;
}

void ExpectBitIdentical(const ModelConfig& c, ModelParams* a, ModelParams* b, const char* what) {
  auto ta = NamedTensors(c, a);
  auto tb = NamedTensors(c, b);
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) {
    ASSERT_EQ(ta[i].data->size(), tb[i].data->size());
    EXPECT_EQ(
        0, std::memcmp(ta[i].data->data(), tb[i].data->data(), sizeof(float) * ta[i].data->size()))
        << what << " " << ta[i].name;
  }
}

// The largest |a - b| over every parameter.
double MaxAbsDifference(const ModelConfig& c, ModelParams* a, ModelParams* b) {
  auto ta = NamedTensors(c, a);
  auto tb = NamedTensors(c, b);
  double worst = 0;
  for (size_t i = 0; i < ta.size(); ++i) {
    for (size_t j = 0; j < ta[i].data->size(); ++j) {
      worst = std::max(worst, static_cast<double>(std::fabs((*ta[i].data)[j] - (*tb[i].data)[j])));
    }
  }
  return worst;
}

// Gradient clipping of a parity run: every step clips (0.5), none does (0: off), or some steps
// clip and some do not (7; the steps' norms are 4.8 to 8.4).
enum class Clip { kAlways, kNever, kSome };

// (tied embeddings, optimizer state on the "nvme" tier, extra activations' worth of device
// budget, scheduled: prefetching with the optimizer on the host overlapping the backward / on
// demand with the optimizer on the device, clipping)
class OffloadParity
    : public ::testing::TestWithParam<std::tuple<bool, bool, int, bool, Clip>> {};

TEST_P(OffloadParity, OversubscribedRunIsBitIdenticalToResidentRun) {
  const auto [tied, nvme, slots, scheduled, clipping] = GetParam();
  TrainerOptions o = DeepOptions(tied);
  const int kSteps = 3;
  if (clipping == Clip::kNever) o.optimizer.grad_clip = 0;
  if (clipping == Clip::kSome) o.optimizer.grad_clip = 7;

  auto resident = OffloadTrainer::Create(o, Resident());
  ASSERT_TRUE(resident.ok()) << resident.status();
  ASSERT_TRUE((*resident)->resident());
  const int64_t least = (*resident)->MinDeviceBytes();
  const int64_t act_bytes = 4 * o.train.micro_batch_size * o.train.seq_len * o.model.hidden_size;

  MemoryTensorHome home;
  OffloadOptions off;
  off.device_budget_bytes = least + slots * act_bytes;
  off.optimizer_state_tier = nvme ? HomeTier::kNvme : HomeTier::kHost;
  off.home = &home;
  off.prefetch = scheduled;
  off.host_optimizer = scheduled;
  off.overlap_optimizer = scheduled;
  auto offloaded = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(offloaded.ok()) << offloaded.status();
  OffloadTrainer& t = **offloaded;
  ASSERT_FALSE(t.resident());
  // Spare memory goes to prefetching and writes in flight first, then to checkpoint slots.
  EXPECT_LE(t.max_resident_activations(), slots);
  const int64_t state = t.TrainingStateBytes();
  const double ratio = static_cast<double>(state) / off.device_budget_bytes;
  std::printf("tied=%d nvme=%d: state %s, budget %s, ratio %.1f, largest op %s\n", tied, nvme,
              FormatBytes(state).c_str(), FormatBytes(off.device_budget_bytes).c_str(), ratio,
              t.LargestOp().c_str());
  ASSERT_GE(ratio, 20.0);

  TrainRun a = Train(resident->get(), kSteps);
  TrainRun b = Train(&t, kSteps);
  ASSERT_EQ(a.steps.size(), kSteps);
  ASSERT_EQ(b.steps.size(), kSteps);
  int clipped_steps = 0, unclipped_steps = 0;
  for (int s = 0; s < kSteps; ++s) {
    const OffloadStepResult& ra = a.steps[s];
    const OffloadStepResult& rb = b.steps[s];
    EXPECT_EQ(0, std::memcmp(&ra.loss, &rb.loss, sizeof(double))) << "step " << s;
    EXPECT_EQ(0, std::memcmp(&ra.grad_norm, &rb.grad_norm, sizeof(double))) << "step " << s;
    const bool clipped = o.optimizer.grad_clip > 0 && ra.grad_norm > o.optimizer.grad_clip;
    if (clipping != Clip::kSome) {
      EXPECT_EQ(clipped, clipping == Clip::kAlways) << "step " << s << ": norm " << ra.grad_norm;
    }
    (clipped ? clipped_steps : unclipped_steps) += 1;
    // AdamW overlaps the backward unless the step before clipped; its results are kept when
    // the step needs no clipping.
    const bool overlapped = scheduled && (s == 0 || !(a.steps[s - 1].grad_norm > o.optimizer.grad_clip &&
                                                     o.optimizer.grad_clip > 0));
    EXPECT_EQ(rb.optimizer_overlapped, overlapped) << "step " << s;
    EXPECT_EQ(rb.optimizer_overlap_kept, overlapped && !clipped) << "step " << s;
    EXPECT_LE(rb.device_memory_peak_bytes, off.device_budget_bytes);
    EXPECT_LE(ra.device_memory_peak_bytes, ra.device_memory_budget_bytes);
    EXPECT_EQ(ra.bytes_moved(), 0);
    const int64_t params = 4 * ParameterCount(o.model);
    if (scheduled) {
      // Parameters move in twice (forward, backward), gradients out once; optimizer state
      // never crosses the link.
      EXPECT_GT(rb.bytes_home_to_device, 2 * params);
      EXPECT_LT(rb.bytes_home_to_device, 3 * params);
      EXPECT_GT(rb.bytes_device_to_home, params);
      EXPECT_LT(rb.bytes_device_to_home, 2 * params);
      // From the second step on reads follow the first step's trace.
      // (With no memory beyond the largest op there is nothing to prefetch into.)
      // (Whether those reads arrived in time depends on the machine's load; that they were
      // issued ahead does not.)
      if (s > 0 && slots > 0) EXPECT_GT(rb.prefetched_reads, 0) << "step " << s;
    } else {
      // Plus once for the optimizer; grads, m, v once each way at least.
      EXPECT_GT(rb.bytes_home_to_device, 3 * params);
      EXPECT_GT(rb.bytes_device_to_home, 3 * params);
      EXPECT_EQ(rb.prefetched_reads, 0);
    }
    EXPECT_LE(rb.prefetch_hits, rb.prefetched_reads);
    EXPECT_LE(rb.prefetched_reads, rb.home_reads);
    EXPECT_GT(rb.home_reads, 0);
    EXPECT_GT(rb.compute_seconds, 0);
    EXPECT_LE(rb.compute_seconds + rb.stall_transfer_seconds + rb.stall_memory_seconds +
                  rb.stall_optimizer_seconds,
              rb.step_time_s * 1.01);
    std::printf(
        "  step %d: grad norm %.4f loss %.9f peak %s moved in %s out %s; reads %ld, ahead %ld, in "
        "time %ld; busy %.2f\n",
        s, rb.grad_norm, rb.loss, FormatBytes(rb.device_memory_peak_bytes).c_str(),
        FormatBytes(rb.bytes_home_to_device).c_str(), FormatBytes(rb.bytes_device_to_home).c_str(),
        static_cast<long>(rb.home_reads), static_cast<long>(rb.prefetched_reads),
        static_cast<long>(rb.prefetch_hits), rb.device_busy_fraction());
  }
  if (clipping == Clip::kSome) {
    EXPECT_GT(clipped_steps, 0);
    EXPECT_GT(unclipped_steps, 0);
  }
  ExpectBitIdentical(o.model, &a.params, &b.params, "param");
  ExpectBitIdentical(o.model, &a.m, &b.m, "exp_avg");
  ExpectBitIdentical(o.model, &a.v, &b.v, "exp_avg_sq");

  // Optimizer state sits in the tier asked for; no activation is left behind in the home. An
  // overlapped update leaves a second generation of parameters and moments ("<id>@1"), which
  // the next one overwrites: one more copy at most.
  bool overlapped = false;
  for (const OffloadStepResult& r : b.steps) overlapped |= r.optimizer_overlapped;
  const int64_t generations = overlapped ? 2 : 1;
  const int64_t moments = 2 * 4 * ParameterCount(o.model);
  EXPECT_EQ(home.bytes_stored(HomeTier::kNvme), nvme ? generations * moments : 0);
  auto needs = OffloadTrainer::Requirements(o);
  ASSERT_TRUE(needs.ok());
  EXPECT_LE(home.peak_bytes_stored(HomeTier::kHost) + home.peak_bytes_stored(HomeTier::kNvme),
            needs->training_state_bytes() + needs->overlap_bytes());
  for (const char* id : {"exp_avg/model.norm.weight", "exp_avg/model.norm.weight@1"}) {
    HomeTier tier;
    if (!home.TierOf(id, &tier).ok()) continue;
    EXPECT_EQ(tier, nvme ? HomeTier::kNvme : HomeTier::kHost) << id;
  }
  const int64_t tensors = static_cast<int64_t>(NamedTensors(o.model, &a.params).size());
  EXPECT_EQ(home.num_tensors(), (1 + 3 * generations) * tensors);
}

INSTANTIATE_TEST_SUITE_P(TiedNvmeSlots, OffloadParity,
                         ::testing::Values(std::make_tuple(false, false, 0, true, Clip::kAlways),
                                           std::make_tuple(false, true, 6, true, Clip::kNever),
                                           std::make_tuple(true, false, 6, true,
                                                           Clip::kSome),
                                           std::make_tuple(true, true, 0, true, Clip::kNever),
                                           std::make_tuple(false, false, 6, true,
                                                           Clip::kSome),
                                           std::make_tuple(false, true, 6, false, Clip::kAlways),
                                           std::make_tuple(true, false, 0, false, Clip::kNever)));

TEST(OffloadTrainerTest, FirstStepIsTracedOpByOp) {
  const TrainerOptions o = DeepOptions(false);
  MemoryTensorHome home;
  OffloadOptions off;
  off.home = &home;
  off.device_budget_bytes = 600 << 10;
  auto t = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->first_step_trace().empty());
  ASSERT_TRUE((*t)->Step().ok());
  const std::vector<TraceEvent> trace = (*t)->first_step_trace();
  int compute = 0, waits = 0;
  double last_start = -1;
  for (const TraceEvent& e : trace) {
    EXPECT_GE(e.start_s, 0);
    EXPECT_GE(e.duration_s, 0);
    if (std::string(e.category) == "compute") {
      // Compute ops run one after another on the device.
      EXPECT_GE(e.start_s, last_start);
      last_start = e.start_s;
      ++compute;
    } else {
      EXPECT_EQ(std::string(e.category), "wait");
      ++waits;
    }
  }
  const int64_t A = o.train.grad_accum_steps, L = o.model.num_hidden_layers;
  // Embedding forward, every layer forward, head, every layer backward, embedding backward:
  // once per micro-batch.
  EXPECT_EQ(compute, A * (2 * L + 3));
  EXPECT_GT(waits, 0);  // the first step reads on demand
  // The first compute op embeds micro-batch 0 (perhaps after waiting for the embedding).
  auto first = std::find_if(trace.begin(), trace.end(), [](const TraceEvent& e) {
    return std::string(e.category) == "compute";
  });
  ASSERT_NE(first, trace.end());
  EXPECT_EQ(first->name, "embedding forward, mb 0");
  // Later steps leave the first step's trace alone.
  ASSERT_TRUE((*t)->Step().ok());
  EXPECT_EQ((*t)->first_step_trace().size(), trace.size());
}

TEST(OffloadTrainerTest, MatchesTrainer) {
  for (bool tied : {false, true}) {
    TrainerOptions o = DeepOptions(tied);
    auto ref = Trainer::Create(o);
    ASSERT_TRUE(ref.ok()) << ref.status();
    MemoryTensorHome home;
    OffloadOptions off;
    off.home = &home;
    off.device_budget_bytes = 600 << 10;
    auto t = OffloadTrainer::Create(o, off);
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_FALSE((*t)->resident());
    bool identical = true;
    for (int s = 0; s < 3; ++s) {
      auto a = (*ref)->Step();
      auto b = (*t)->Step();
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_NEAR(a->loss, b->loss, 1e-6 * std::abs(a->loss)) << "step " << s;
      EXPECT_NEAR(a->grad_norm, b->grad_norm, 1e-5 * a->grad_norm) << "step " << s;
      EXPECT_EQ(a->lr, b->lr);
      identical = identical && a->loss == b->loss && a->grad_norm == b->grad_norm;
    }
    auto p = (*t)->GatherParams();
    ASSERT_TRUE(p.ok());
    ModelParams q = (*ref)->params();
    auto tp = NamedTensors(o.model, &*p);
    auto tq = NamedTensors(o.model, &q);
    double max_diff = 0;
    bool weights_identical = true;
    for (size_t i = 0; i < tp.size(); ++i) {
      for (size_t j = 0; j < tp[i].data->size(); ++j) {
        max_diff = std::max(max_diff, std::abs(double{(*tp[i].data)[j]} - (*tq[i].data)[j]));
      }
      weights_identical = weights_identical && std::memcmp(tp[i].data->data(), tq[i].data->data(),
                                                           4 * tp[i].data->size()) == 0;
    }
    EXPECT_LT(max_diff, 1e-5);
    if (!tied) {
      // Untied: every gradient element gets its micro-batch contributions in the same order as
      // Trainer, so the runs agree bit for bit. Tied: the LM head's and the embedding's
      // contributions to embed_tokens are summed in a different order (head for all
      // micro-batches first), so the last bits differ.
      EXPECT_TRUE(identical);
      EXPECT_TRUE(weights_identical);
    }
    std::printf(
        "tied=%d: losses/grad norms bit-identical to Trainer: %s; weights: %s (max "
        "|diff| %g)\n",
        tied, identical ? "yes" : "no", weights_identical ? "yes" : "no", max_diff);
  }
}

// The coordinator's schedule drives the first step's parameter reads (later steps follow their
// own trace): one layer ahead, as the planner's prefetch distance 1.
TEST(OffloadTrainerTest, ScheduleReadsParametersAheadInTheFirstStep) {
  const TrainerOptions o = DeepOptions(false);
  const int L = static_cast<int>(o.model.num_hidden_layers);
  ParameterSchedule schedule;
  schedule.at_op.assign(2 * L + 3, {});
  schedule.at_op[0] = {0, 1};
  for (int k = 1; k <= L; ++k) schedule.at_op[k] = {k + 1};  // forward k-1: the next layer
  schedule.at_op[L + 1] = {L};                               // head: the top layer's backward
  for (int j = L; j >= 1; --j) schedule.at_op[2 * L + 2 - j] = {j - 1};

  auto resident = OffloadTrainer::Create(o, Resident());
  ASSERT_TRUE(resident.ok()) << resident.status();
  const int64_t act_bytes = 4 * o.train.micro_batch_size * o.train.seq_len * o.model.hidden_size;
  std::vector<OffloadStepResult> firsts;
  for (bool scheduled : {false, true}) {
    MemoryTensorHome home;
    OffloadOptions off;
    off.home = &home;
    off.device_budget_bytes = (*resident)->MinDeviceBytes() + 6 * act_bytes;
    if (scheduled) off.schedule = schedule;
    auto t = OffloadTrainer::Create(o, off);
    ASSERT_TRUE(t.ok()) << t.status();
    auto r = (*t)->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_LE(r->device_memory_peak_bytes, off.device_budget_bytes);
    firsts.push_back(*r);
  }
  EXPECT_EQ(firsts[0].prefetched_reads, 0);  // on demand: nothing to read ahead from
  EXPECT_GT(firsts[1].prefetched_reads, 0);
  EXPECT_LE(firsts[1].prefetch_hits, firsts[1].prefetched_reads);
  EXPECT_EQ(firsts[0].home_reads, firsts[1].home_reads);
  EXPECT_EQ(0, std::memcmp(&firsts[0].loss, &firsts[1].loss, sizeof(double)));
  EXPECT_EQ(0, std::memcmp(&firsts[0].grad_norm, &firsts[1].grad_norm, sizeof(double)));
  std::printf("first step: %ld of %ld reads issued ahead with the schedule, %ld arrived in time\n",
              static_cast<long>(firsts[1].prefetched_reads),
              static_cast<long>(firsts[1].home_reads), static_cast<long>(firsts[1].prefetch_hits));
}

// A home that, once armed, turns the nth read of one tensor into infinities.
class FaultyHome : public MemoryTensorHome {
 public:
  void Arm(const std::string& id, int nth) {
    absl::MutexLock lock(&mu_);
    id_ = id;
    left_ = nth;
  }
  absl::Status Get(const std::string& id, float* data, int64_t n) override {
    absl::Status status = MemoryTensorHome::Get(id, data, n);
    if (!status.ok()) return status;
    absl::MutexLock lock(&mu_);
    if (id == id_ && left_ > 0 && --left_ == 0) {
      std::fill(data, data + n, std::numeric_limits<float>::infinity());
    }
    return absl::OkStatus();
  }

 private:
  absl::Mutex mu_;
  std::string id_;
  int left_ = 0;
};

// A non-finite gradient norm leaves everything as it was, although AdamW had already updated
// the layers above (overlapping the backward): the next step runs as if the bad one never had.
TEST(OffloadTrainerTest, NonFiniteGradientDropsOverlappedUpdates) {
  TrainerOptions o = DeepOptions(false);
  o.optimizer.grad_clip = 0;  // every step overlaps
  auto resident = OffloadTrainer::Create(o, Resident());
  ASSERT_TRUE(resident.ok()) << resident.status();
  FaultyHome home;
  OffloadOptions off;
  off.home = &home;
  off.overlap_optimizer = true;
  off.device_budget_bytes = (*resident)->MinDeviceBytes();
  auto t = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_FALSE((*t)->resident());
  auto before = (*t)->GatherParams();
  ASSERT_TRUE(before.ok());
  const int64_t tensors = static_cast<int64_t>(NamedTensors(o.model, &*before).size());

  // Layer 3's second read of the step is its backward's: its gradient becomes non-finite
  // after layers 4-15 have been updated.
  home.Arm("param/model.layers.3.mlp.up_proj.weight", 2);
  auto bad = (*t)->Step();
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(bad.status().message(), HasSubstr("step 0: gradient norm is"));
  EXPECT_EQ((*t)->step(), 0);
  auto after = (*t)->GatherParams();
  ASSERT_TRUE(after.ok());
  ExpectBitIdentical(o.model, &*before, &*after, "param");
  ModelParams m, v;
  ASSERT_TRUE((*t)->GatherOptimizerState(&m, &v).ok());
  for (const NamedTensor<float>& x : NamedTensors(o.model, &m)) {
    EXPECT_EQ(*std::max_element(x.data->begin(), x.data->end()), 0.0f) << x.name;
  }
  // Parameters, gradients, m and v, and the ignored updates' second generation of every
  // tensor (the backward runs to the end before the norm is known; the next overlapped update
  // overwrites them).
  EXPECT_EQ(home.num_tensors(), 7 * tensors);

  TrainRun a = Train(resident->get(), 2);
  TrainRun b = Train(t->get(), 2);
  ASSERT_EQ(b.steps.size(), 2u);
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(0, std::memcmp(&a.steps[s].loss, &b.steps[s].loss, sizeof(double))) << s;
    EXPECT_TRUE(b.steps[s].optimizer_overlap_kept) << s;
  }
  ExpectBitIdentical(o.model, &a.params, &b.params, "param");
  ExpectBitIdentical(o.model, &a.v, &b.v, "exp_avg_sq");
}

TEST(OffloadTrainerTest, BudgetBelowOneLayerFailsNamingTheLayer) {
  TrainerOptions o = DeepOptions(false);
  MemoryTensorHome home;
  OffloadOptions off;
  off.home = &home;
  off.device_budget_bytes = 1;
  auto probe = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(probe.ok()) << probe.status();
  const int64_t least = (*probe)->MinDeviceBytes();
  EXPECT_EQ((*probe)->LargestOp(), "backward of layer 15");
  off.device_budget_bytes = least - 1;
  auto t = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(t.ok()) << t.status();
  auto r = (*t)->Step();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("step 0: backward of layer 15 needs "));
  EXPECT_THAT(r.status().message(), HasSubstr(absl::StrCat("(", least, " bytes)")));
  EXPECT_THAT(r.status().message(), HasSubstr(absl::StrCat("(", least - 1, " bytes)")));
  EXPECT_EQ((*t)->step(), 0);
  // Exactly the least budget works.
  off.device_budget_bytes = least;
  auto ok = OffloadTrainer::Create(o, off);
  ASSERT_TRUE(ok.ok());
  auto s = (*ok)->Step();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LE(s->device_memory_peak_bytes, least);
}

TEST(OffloadTrainerTest, NullHomeNeedsEverythingToFit) {
  TrainerOptions o = DeepOptions(false);
  OffloadOptions off;
  off.device_budget_bytes = 1 << 20;
  auto t = OffloadTrainer::Create(o, off);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(t.status().message(), HasSubstr("offload.home is null"));
}

TEST(DeviceMemoryTest, RefusesOverBudgetNamingTheOp) {
  DeviceMemory mem(4 << 20);
  auto a = mem.Allocate(3 << 20, "forward of layer 2: parameters");
  ASSERT_TRUE(a.ok());
  auto b = mem.Allocate(2 << 20, "forward of layer 3: parameters");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(b.status().message(),
            "forward of layer 3: parameters needs 2.00 MiB (2097152 bytes) more; device budget "
            "4.00 MiB (4194304 bytes), in use 3.00 MiB (3145728 bytes)");
  EXPECT_EQ(mem.in_use(), 3 << 20);
  a->Release();
  EXPECT_EQ(mem.in_use(), 0);
  EXPECT_EQ(mem.peak(), 3 << 20);
  mem.ResetPeak();
  EXPECT_EQ(mem.peak(), 0);
}

TEST(MemoryTensorHomeTest, PutGetFreeAndCounts) {
  MemoryTensorHome home;
  const std::vector<float> x = {1, 2, 3};
  ASSERT_TRUE(home.Put("a", x.data(), 3, HomeTier::kNvme).ok());
  std::vector<float> y(3);
  ASSERT_TRUE(home.Get("a", y.data(), 3).ok());
  EXPECT_EQ(x, y);
  absl::Status s = home.Get("a", y.data(), 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("holds 3 floats"));
  EXPECT_EQ(home.Get("b", y.data(), 3).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(home.bytes_stored(HomeTier::kNvme), 12);
  EXPECT_EQ(home.bytes_in(), 12);
  EXPECT_EQ(home.bytes_out(), 12);
  ASSERT_TRUE(home.Free("a").ok());
  EXPECT_EQ(home.bytes_stored(HomeTier::kNvme), 0);
  EXPECT_EQ(home.Free("a").code(), absl::StatusCode::kNotFound);
}

TEST(ThrottledTensorHomeTest, PassesBytesThroughAndAccountsTheLink) {
  MemoryTensorHome inner;
  ThrottledTensorHome link(&inner, /*bytes_per_s=*/4e6);  // 4 MB/s: 1000 floats take 1 ms
  std::vector<float> in(1000), out(1000, 0.0f);
  for (int i = 0; i < 1000; ++i) in[i] = 0.5f * i - 7.0f;
  ASSERT_TRUE(link.Put("t", in.data(), 1000, HomeTier::kNvme).ok());
  ASSERT_TRUE(link.Get("t", out.data(), 1000).ok());
  EXPECT_EQ(in, out);
  HomeTier tier;
  ASSERT_TRUE(inner.TierOf("t", &tier).ok());
  EXPECT_EQ(tier, HomeTier::kNvme);
  EXPECT_DOUBLE_EQ(link.device_to_home_seconds(), 4000 / 4e6);
  EXPECT_DOUBLE_EQ(link.home_to_device_seconds(), 4000 / 4e6);
  EXPECT_EQ(link.Get("missing", out.data(), 1).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(link.Free("t").ok());
  EXPECT_EQ(inner.num_tensors(), 0);
}

TEST(OffloadTrainerTest, ExportWritesTheTrainerDirectory) {
  TrainerOptions o = DeepOptions(true);
  MemoryTensorHome home;
  OffloadOptions off;
  off.home = &home;
  off.device_budget_bytes = 500 << 10;
  auto t = OffloadTrainer::Create(o, off);
  auto r = OffloadTrainer::Create(o, Resident());
  ASSERT_TRUE(t.ok() && r.ok());
  ASSERT_TRUE((*t)->Step().ok());
  ASSERT_TRUE((*r)->Step().ok());
  const std::string d1 = TempPath("offload_export"), d2 = TempPath("resident_export");
  ASSERT_TRUE((*t)->Export(d1).ok());
  ASSERT_TRUE((*r)->Export(d2).ok());
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors"}) {
    const std::string a = FileBytes(d1 + "/" + f);
    EXPECT_FALSE(a.empty()) << f;
    EXPECT_EQ(a, FileBytes(d2 + "/" + f)) << f;
  }
  // Trainer reads it back: the weights and the optimizer state.
  ModelParams loaded = AllocateParams<float>(o.model);
  ASSERT_TRUE(LoadWeights(d1, o.model, &loaded).ok());
  auto p = (*t)->GatherParams();
  ASSERT_TRUE(p.ok());
  ExpectBitIdentical(o.model, &loaded, &*p, "exported");
  auto tr = Trainer::Create(o);
  ASSERT_TRUE(tr.ok());
  ASSERT_TRUE((*tr)->LoadOptimizerState(d1 + "/optimizer.safetensors").ok());
  EXPECT_EQ((*tr)->step(), 1);
}

// A trainer created from a checkpoint (weights from init_from, moments and step counter from
// optimizer_state_from) continues exactly where the exported trainer stood: the same batches,
// learning rates, losses and final state, bit for bit, resident or streamed.
TEST(OffloadTrainerTest, ContinuesFromACheckpointAsIfNeverStopped) {
  for (bool streamed : {false, true}) {
    SCOPED_TRACE(streamed ? "streamed" : "resident");
    TrainerOptions o = DeepOptions(false);
    o.optimizer.grad_clip = 7;  // some steps clip, some do not
    MemoryTensorHome home1, home2;
    auto options = [&](MemoryTensorHome* home) {
      if (!streamed) return Resident();
      OffloadOptions off;
      off.home = home;
      off.device_budget_bytes = 500 << 10;
      return off;
    };
    auto whole = OffloadTrainer::Create(o, options(&home1));
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_EQ((*whole)->resident(), !streamed);
    TrainRun first = Train(whole->get(), 2);
    const std::string dir = TempPath(streamed ? "resume_streamed" : "resume_resident");
    ASSERT_TRUE((*whole)->Export(dir).ok());
    TrainRun rest = Train(whole->get(), 2);

    TrainerOptions r = o;
    r.init_from = dir;
    r.optimizer_state_from = dir + "/optimizer.safetensors";
    auto resumed = OffloadTrainer::Create(r, options(&home2));
    ASSERT_TRUE(resumed.ok()) << resumed.status();
    EXPECT_EQ((*resumed)->step(), 2);
    TrainRun again = Train(resumed->get(), 2);
    ASSERT_EQ(again.steps.size(), 2u);
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(again.steps[i].step, 2 + i);
      EXPECT_EQ(again.steps[i].lr, rest.steps[i].lr);
      EXPECT_EQ(0, std::memcmp(&again.steps[i].loss, &rest.steps[i].loss, sizeof(double)));
      EXPECT_EQ(0,
                std::memcmp(&again.steps[i].grad_norm, &rest.steps[i].grad_norm, sizeof(double)));
    }
    ExpectBitIdentical(o.model, &again.params, &rest.params, "params");
    ExpectBitIdentical(o.model, &again.m, &rest.m, "exp_avg");
    ExpectBitIdentical(o.model, &again.v, &rest.v, "exp_avg_sq");

    // The reference trainer reads the same options.
    auto reference = Trainer::Create(r);
    ASSERT_TRUE(reference.ok()) << reference.status();
    EXPECT_EQ((*reference)->step(), 2);
  }
  // A missing optimizer state is an error naming the file.
  TrainerOptions bad = DeepOptions(false);
  bad.optimizer_state_from = TempPath("no_such_dir") + "/optimizer.safetensors";
  auto t = OffloadTrainer::Create(bad, Resident());
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("no_such_dir"));
}

// The layer-wise model API reproduces ForwardBackward bit for bit with one micro-batch.
TEST(LayerwiseModelTest, MatchesForwardBackward) {
  for (bool tied : {false, true}) {
    TrainerOptions o = DeepOptions(tied);
    o.model.num_hidden_layers = 3;
    const ModelConfig& c = o.model;
    const int64_t B = 2, T = 8, n = B * T;
    LlamaModel full(c, false, nullptr);
    InitParams(c, 3, &full.params());
    std::vector<int32_t> in(n), tg(n);
    for (int64_t i = 0; i < n; ++i) {
      in[i] = static_cast<int32_t>((i * 5) % c.vocab_size);
      tg[i] = static_cast<int32_t>((i * 11 + 3) % c.vocab_size);
    }
    full.ZeroGrads();
    auto ref = full.ForwardBackward(in.data(), tg.data(), B, T, 0.5f);
    ASSERT_TRUE(ref.ok());

    auto lw = LlamaModel::CreateUnallocated(c, nullptr);
    // A layer that is not loaded is refused.
    std::vector<float> x(n * c.hidden_size), y(n * c.hidden_size);
    absl::Status s = lw->DecoderLayerForward(1, x.data(), y.data(), B, T);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(s.message(), HasSubstr("params of layer 1: input_layernorm holds 0 of 64"));

    lw->params() = full.params();
    lw->grads() = AllocateParams<float>(c);
    std::vector<std::vector<float>> xs(c.num_hidden_layers + 1,
                                       std::vector<float>(n * c.hidden_size));
    ASSERT_TRUE(lw->EmbedForward(in.data(), B, T, xs[0].data()).ok());
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      ASSERT_TRUE(lw->DecoderLayerForward(l, xs[l].data(), xs[l + 1].data(), B, T).ok());
    }
    std::vector<float> dy(n * c.hidden_size), dx(n * c.hidden_size);
    auto loss = lw->HeadForwardBackward(xs.back().data(), tg.data(), B, T, 0.5f, dy.data());
    ASSERT_TRUE(loss.ok());
    EXPECT_EQ(*loss, *ref);
    for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
      ASSERT_TRUE(lw->DecoderLayerBackward(l, xs[l].data(), dy.data(), dx.data(), B, T).ok());
      std::swap(dy, dx);
    }
    ASSERT_TRUE(lw->EmbedBackward(in.data(), B, T, dy.data()).ok());
    ExpectBitIdentical(c, &full.grads(), &lw->grads(), "grad");
  }
}

}  // namespace
}  // namespace lumen::engine

namespace lumen::engine {
namespace {

// Data parallel: replicas training shares of each step's micro-batches (even and uneven), their
// gradients summed, stay bit-identical to each other and match one trainer of all of them to
// rounding (the sums are added in another order).
TEST(OffloadTrainerTest, DataParallelReplicasMatchOneTrainer) {
  for (int64_t micro_batches : {4, 3}) {
    TrainerOptions o = DeepOptions(micro_batches == 3);
    o.train.grad_accum_steps = micro_batches;
    o.train.steps = 5;
    o.num_threads = 1;
    auto single = OffloadTrainer::Create(o, Resident());
    ASSERT_TRUE(single.ok()) << single.status();
    TrainRun one = Train(single->get(), 5);

    LocalCollectives group(2);
    std::vector<std::unique_ptr<OffloadTrainer>> replicas;
    for (int r = 0; r < 2; ++r) {
      const MicroBatchShare share = MicroBatchShareOf(micro_batches, r, 2);
      TrainerOptions ro = o;
      ro.train.grad_accum_steps = share.count;
      OffloadOptions off = Resident();
      off.replica.collective = group.Member(r);
      off.replica.micro_batch_offset = share.first;
      off.replica.global_micro_batches = micro_batches;
      auto t = OffloadTrainer::Create(ro, off);
      ASSERT_TRUE(t.ok()) << t.status();
      replicas.push_back(*std::move(t));
    }
    TrainRun runs[2];
    std::thread second([&] { runs[1] = Train(replicas[1].get(), 5); });
    runs[0] = Train(replicas[0].get(), 5);
    second.join();
    ASSERT_EQ(runs[0].steps.size(), 5u);
    ASSERT_EQ(runs[1].steps.size(), 5u);
    for (int s = 0; s < 5; ++s) {
      EXPECT_EQ(runs[0].steps[s].loss, runs[1].steps[s].loss) << "step " << s;
      EXPECT_EQ(runs[0].steps[s].grad_norm, runs[1].steps[s].grad_norm) << "step " << s;
      EXPECT_EQ(runs[0].steps[s].tokens, one.steps[s].tokens);
      EXPECT_NEAR(runs[0].steps[s].loss, one.steps[s].loss, 1e-5 * one.steps[s].loss)
          << micro_batches << " micro-batches, step " << s;
      EXPECT_NEAR(runs[0].steps[s].grad_norm, one.steps[s].grad_norm,
                  1e-4 * one.steps[s].grad_norm);
    }
    ExpectBitIdentical(o.model, &runs[0].params, &runs[1].params, "replica params");
    ExpectBitIdentical(o.model, &runs[0].m, &runs[1].m, "replica exp_avg");
    const double worst = MaxAbsDifference(o.model, &runs[0].params, &one.params);
    EXPECT_LT(worst, 1e-4) << micro_batches << " micro-batches";
  }
}

// Data parallel with offloaded state: the replicas share one copy of the parameters and AdamW
// moments in the home, each keeping its gradients and activation checkpoints under its own
// names; each tensor's gradients are summed and its AdamW run by one replica. Together they
// train as one offloaded trainer of all the micro-batches does, to rounding, with and without
// clipping, tied and untied.
TEST(OffloadTrainerTest, DataParallelReplicasShareOffloadedState) {
  for (bool tied : {false, true}) {
    TrainerOptions o = DeepOptions(tied);
    o.train.grad_accum_steps = 4;
    o.train.steps = 4;
    o.num_threads = 1;
    // Untied: every step clips (0.5); tied: none does.
    if (tied) o.optimizer.grad_clip = 0;
    MemoryTensorHome single_home;
    OffloadOptions off;
    off.home = &single_home;
    off.device_budget_bytes = 600 << 10;
    auto single = OffloadTrainer::Create(o, off);
    ASSERT_TRUE(single.ok()) << single.status();
    ASSERT_FALSE((*single)->resident());
    TrainRun one = Train(single->get(), 4);

    MemoryTensorHome shared;
    LocalCollectives group(2);
    TrainRun runs[2];
    bool resident[2] = {true, true};
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        const MicroBatchShare share = MicroBatchShareOf(4, r, 2);
        TrainerOptions ro = o;
        ro.train.grad_accum_steps = share.count;
        OffloadOptions roff = off;
        roff.home = &shared;
        roff.replica.collective = group.Member(r);
        roff.replica.micro_batch_offset = share.first;
        roff.replica.global_micro_batches = 4;
        auto t = OffloadTrainer::Create(ro, roff);
        ASSERT_TRUE(t.ok()) << t.status();
        resident[r] = (*t)->resident();
        runs[r] = Train(t->get(), 4);
      });
    }
    for (std::thread& t : threads) t.join();
    EXPECT_FALSE(resident[0]);
    EXPECT_FALSE(resident[1]);
    ASSERT_EQ(runs[0].steps.size(), 4u);
    ASSERT_EQ(runs[1].steps.size(), 4u);
    for (int s = 0; s < 4; ++s) {
      EXPECT_EQ(runs[0].steps[s].loss, runs[1].steps[s].loss) << "step " << s;
      EXPECT_EQ(runs[0].steps[s].grad_norm, runs[1].steps[s].grad_norm) << "step " << s;
      EXPECT_EQ(runs[0].steps[s].tokens, one.steps[s].tokens);
      EXPECT_NEAR(runs[0].steps[s].loss, one.steps[s].loss, 1e-5 * one.steps[s].loss)
          << "tied " << tied << ", step " << s;
      EXPECT_NEAR(runs[0].steps[s].grad_norm, one.steps[s].grad_norm,
                  1e-4 * one.steps[s].grad_norm);
      // Each replica read every parameter from the home.
      EXPECT_GT(runs[0].steps[s].bytes_home_to_device, 0);
    }
    const double worst = MaxAbsDifference(o.model, &runs[0].params, &one.params);
    EXPECT_LT(worst, 1e-4) << "tied " << tied;
    // One copy of the parameters and moments; the gradients twice, once per replica; no
    // activation checkpoint left. One trainer alone holds the state and one set of gradients.
    const std::vector<NamedTensor<float>> names = NamedTensors(o.model, &runs[0].params);
    const int64_t tensors = static_cast<int64_t>(names.size());
    EXPECT_EQ(single_home.num_tensors(), 4 * tensors);
    EXPECT_EQ(shared.num_tensors(), 5 * tensors);
    HomeTier tier;
    for (const NamedTensor<float>& t : names) {
      EXPECT_TRUE(shared.TierOf("param/" + t.name, &tier).ok()) << t.name;
      EXPECT_TRUE(shared.TierOf(OffloadTrainer::ReplicaPrefix(1) + "grad/" + t.name, &tier).ok());
      EXPECT_FALSE(shared.TierOf(OffloadTrainer::ReplicaPrefix(1) + "param/" + t.name, &tier).ok());
    }
  }
}

}  // namespace
}  // namespace lumen::engine
