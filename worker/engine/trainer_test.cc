#include "worker/engine/trainer.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/test_util.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/safetensors.h"
#include "worker/engine/thread_pool.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

TrainerOptions SmallOptions(bool tied) {
  TrainerOptions o;
  o.model.hidden_size = 32;
  o.model.intermediate_size = 48;
  o.model.num_hidden_layers = 2;
  o.model.num_attention_heads = 4;
  o.model.num_key_value_heads = 2;
  o.model.vocab_size = 64;
  o.model.max_position_embeddings = 32;
  o.model.tie_word_embeddings = tied;
  o.model.init_std = 0.05;
  o.optimizer.lr = 3e-3;
  o.optimizer.warmup_steps = 2;
  o.optimizer.min_lr = 3e-4;
  o.optimizer.weight_decay = 0.1;
  o.optimizer.grad_clip = 1.0;
  o.train.steps = 6;
  o.train.seq_len = 16;
  o.train.micro_batch_size = 3;
  o.train.grad_accum_steps = 2;
  o.train.seed = 5;
  o.data.path = WriteTokens("train.bin", 5000, 64);
  o.num_threads = 2;
  return o;
}

std::vector<double> RunSteps(Trainer* t, int n) {
  std::vector<double> losses;
  for (int i = 0; i < n; ++i) {
    auto r = t->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    EXPECT_EQ(r->step, i);
    EXPECT_EQ(r->tokens, 2 * 3 * 16);
    EXPECT_TRUE(std::isfinite(r->grad_norm));
    losses.push_back(r->loss);
  }
  return losses;
}

bool SameWeights(const ModelConfig& c, const ModelParams& a, const ModelParams& b) {
  auto ta = NamedTensors(c, const_cast<ModelParams*>(&a));
  auto tb = NamedTensors(c, const_cast<ModelParams*>(&b));
  for (size_t i = 0; i < ta.size(); ++i) {
    if (ta[i].data->size() != tb[i].data->size() ||
        std::memcmp(ta[i].data->data(), tb[i].data->data(), 4 * ta[i].data->size()) != 0) {
      return false;
    }
  }
  return true;
}

// The original single-stream draw, as InitParams documents it.
void ReferenceInit(const ModelConfig& c, uint64_t seed, ModelParams* p) {
  *p = AllocateParams<float>(c);
  std::mt19937_64 rng(seed);
  bool has_spare = false;
  double spare = 0;
  auto normal = [&]() {
    if (has_spare) {
      has_spare = false;
      return spare;
    }
    const double u1 = static_cast<double>((rng() >> 11) + 1) * 0x1.0p-53;
    const double u2 = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare = r * std::sin(2.0 * M_PI * u2);
    has_spare = true;
    return r * std::cos(2.0 * M_PI * u2);
  };
  for (NamedTensor<float>& t : NamedTensors(c, p)) {
    for (float& x : *t.data) {
      x = t.shape.size() == 1 ? 1.0f : static_cast<float>(c.init_std * normal());
    }
  }
}

// The pooled initialisation gives the documented stream's values bit for bit, across the
// blocks it draws ahead and matrices of odd sizes (a pair spanning two tensors).
TEST(TrainerTest, InitParamsWithAPoolIsTheSameStream) {
  ModelConfig c = SmallOptions(false).model;
  c.hidden_size = 96;
  c.intermediate_size = 203;  // odd matrix sizes
  c.num_attention_heads = 3;
  c.num_key_value_heads = 1;
  c.vocab_size = 12345;
  c.num_hidden_layers = 12;  // ~3.5M values: more than one block of 2^20 pairs
  ModelParams want, seq, pooled;
  ReferenceInit(c, 17, &want);
  InitParams(c, 17, &seq);
  ThreadPool pool(3);
  InitParams(c, 17, &pooled, &pool);
  auto w = NamedTensors(c, &want);
  auto s = NamedTensors(c, &seq);
  auto p = NamedTensors(c, &pooled);
  int64_t total = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(*s[i].data, *w[i].data) << w[i].name;
    EXPECT_EQ(*p[i].data, *w[i].data) << w[i].name;
    total += static_cast<int64_t>(w[i].data->size());
  }
  EXPECT_GT(total, int64_t{2} << 20);
}

// A tensor at a time, each into its own buffer (the stream's pairs span tensors of odd sizes),
// the values are InitParams' (the documented stream's); asked out of order, it refuses.
TEST(TrainerTest, RandomWeightsStreamsTheSameValuesInOrder) {
  ModelConfig c = SmallOptions(true).model;
  c.hidden_size = 96;
  c.intermediate_size = 203;
  c.num_attention_heads = 3;
  c.num_key_value_heads = 1;
  c.vocab_size = 1001;
  ModelParams want;
  ReferenceInit(c, 5, &want);
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    RandomWeights source(c, 5, &pool);
    for (const NamedTensor<float>& t : NamedTensors(c, &want)) {
      std::vector<float> got(t.data->size(), -7.0f);
      ASSERT_TRUE(source.Read(t.name, got.data()).ok()) << t.name;
      EXPECT_EQ(got, *t.data) << t.name << " with " << threads << " threads";
    }
    std::vector<float> extra(4);
    const absl::Status done = source.Read("model.norm.weight", extra.data());
    EXPECT_EQ(done.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(done.message()), HasSubstr("none (all were handed out)"));
  }
  RandomWeights skipping(c, 5);
  std::vector<float> buf(c.hidden_size * c.hidden_size);
  const absl::Status s = skipping.Read("model.layers.0.self_attn.q_proj.weight", buf.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("the next tensor in order is model.embed_tokens.weight"));
}

TEST(TrainerTest, DeterministicAcrossRunsAndCheckpointing) {
  for (bool tied : {false, true}) {
    TrainerOptions o = SmallOptions(tied);
    auto a = Trainer::Create(o);
    auto b = Trainer::Create(o);
    o.activation_checkpointing = true;
    auto c = Trainer::Create(o);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status() << b.status() << c.status();
    const auto la = RunSteps(a->get(), 6), lb = RunSteps(b->get(), 6), lc = RunSteps(c->get(), 6);
    EXPECT_EQ(la, lb);
    EXPECT_EQ(la, lc);
    EXPECT_TRUE(SameWeights(o.model, (*a)->params(), (*b)->params()));
    EXPECT_TRUE(SameWeights(o.model, (*a)->params(), (*c)->params()));
    EXPECT_LT(la.back(), la.front());  // it learns something
    EXPECT_NEAR(la.front(), std::log(64.0), 0.2);
  }
}

TEST(TrainerTest, StepReportsScheduleAndInitialLoss) {
  TrainerOptions o = SmallOptions(false);
  auto t = Trainer::Create(o);
  ASSERT_TRUE(t.ok());
  auto r0 = (*t)->Step();
  ASSERT_TRUE(r0.ok());
  EXPECT_DOUBLE_EQ(r0->lr, 3e-3 * 1 / 2);
  auto r1 = (*t)->Step();
  EXPECT_DOUBLE_EQ(r1->lr, 3e-3);
  EXPECT_GT(r1->step_time_s, 0);
}

TEST(TrainerTest, ExportAndReload) {
  TrainerOptions o = SmallOptions(false);
  auto t = Trainer::Create(o);
  ASSERT_TRUE(t.ok());
  RunSteps(t->get(), 3);
  const std::string dir = TempPath("export1");
  ASSERT_TRUE((*t)->Export(dir).ok());
  auto cfg = ReadHfConfig(dir + "/config.json");
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->hidden_size, 32);
  EXPECT_EQ(cfg->num_key_value_heads, 2);
  EXPECT_FALSE(cfg->tie_word_embeddings);
  EXPECT_EQ(cfg->rms_norm_eps, o.model.rms_norm_eps);

  auto st = ReadSafetensors(dir + "/model.safetensors");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->metadata.at("format"), "pt");
  EXPECT_EQ(st->tensors.count("lm_head.weight"), 1u);
  EXPECT_EQ(st->tensors.at("model.layers.1.self_attn.k_proj.weight").shape,
            (std::vector<int64_t>{16, 32}));

  // Resume: a trainer initialised from the export + optimizer state continues identically.
  TrainerOptions o2 = o;
  o2.init_from = dir;
  auto t2 = Trainer::Create(o2);
  ASSERT_TRUE(t2.ok()) << t2.status();
  EXPECT_TRUE(SameWeights(o.model, (*t)->params(), (*t2)->params()));
  ASSERT_TRUE((*t2)->LoadOptimizerState(dir + "/optimizer.safetensors").ok());
  EXPECT_EQ((*t2)->step(), 3);
  auto ra = (*t)->Step();
  auto rb = (*t2)->Step();
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_EQ(ra->loss, rb->loss);
  EXPECT_TRUE(SameWeights(o.model, (*t)->params(), (*t2)->params()));

  // init_from a single file works too.
  o2.init_from = dir + "/model.safetensors";
  EXPECT_TRUE(Trainer::Create(o2).ok());
}

TEST(TrainerTest, LoadErrorsNameTensorAndShapes) {
  TrainerOptions o = SmallOptions(false);
  auto t = Trainer::Create(o);
  ASSERT_TRUE(t.ok());
  const std::string dir = TempPath("export2");
  ASSERT_TRUE((*t)->Export(dir).ok());
  // Bigger model: mis-shaped tensor.
  ModelConfig big = o.model;
  big.intermediate_size = 64;
  ModelParams p;
  absl::Status s = LoadWeights(dir, big, &p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("model.layers.0.mlp.gate_proj.weight has shape [48, 32], the model "
                        "needs [64, 32]"));
  // Tied export lacks lm_head: loading it as untied fails naming lm_head.weight.
  TrainerOptions ot = SmallOptions(true);
  auto tt = Trainer::Create(ot);
  ASSERT_TRUE(tt.ok());
  ASSERT_TRUE((*tt)->Export(TempPath("export3")).ok());
  s = LoadWeights(TempPath("export3"), o.model, &p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("lm_head.weight (shape [64, 32]) is missing"));
  // Untied export loads as tied (lm_head ignored).
  EXPECT_TRUE(LoadWeights(dir, ot.model, &p).ok());
}

TEST(TrainerTest, CreateErrors) {
  TrainerOptions o = SmallOptions(false);
  o.model.num_key_value_heads = 3;
  EXPECT_THAT(std::string(Trainer::Create(o).status().message()),
              HasSubstr("num_key_value_heads 3"));
  o = SmallOptions(false);
  o.train.seq_len = 64;
  EXPECT_THAT(std::string(Trainer::Create(o).status().message()),
              HasSubstr("exceeds max_position_embeddings 32"));
  o = SmallOptions(false);
  o.data.path = TempPath("nope.bin");
  EXPECT_EQ(Trainer::Create(o).status().code(), absl::StatusCode::kNotFound);
  o = SmallOptions(false);
  o.init_from = TempPath("nope.safetensors");
  EXPECT_EQ(Trainer::Create(o).status().code(), absl::StatusCode::kNotFound);
}

TEST(TrainerTest, BadTokenFailsStepWithoutChangingWeights) {
  TrainerOptions o = SmallOptions(false);
  o.data.path = WriteTokens("bad.bin", 5000, 200);  // ids up to 199 >= vocab 64
  auto t = Trainer::Create(o);
  ASSERT_TRUE(t.ok());
  const ModelParams before = (*t)->params();
  auto r = (*t)->Step();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("bad.bin"));
  EXPECT_EQ((*t)->step(), 0);
  EXPECT_TRUE(SameWeights(o.model, before, (*t)->params()));
}

std::vector<char> FileBytes(const std::string& path) {
  std::vector<char> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return out;
  char buf[4096];
  size_t r;
  while ((r = std::fread(buf, 1, sizeof(buf), f)) > 0) out.insert(out.end(), buf, buf + r);
  std::fclose(f);
  return out;
}

TEST(TrainerTest, NanLossFailsStepNamingStepAndMicroBatchAndKeepsState) {
  TrainerOptions o = SmallOptions(false);
  // Token 63 appears once, at position 245: step 2, micro-batch 2 of 2 (A=2, B=3, T=16 read
  // [96s + 48a, 96s + 48a + 49)), so a NaN in its embedding row poisons only that micro-batch.
  {
    std::vector<uint16_t> toks(5000);
    for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<uint16_t>((i * 7) % 50);
    toks[245] = 63;
    o.data.path = TempPath("nan.bin");
    FILE* f = std::fopen(o.data.path.c_str(), "wb");
    std::fwrite(toks.data(), 2, toks.size(), f);
    std::fclose(f);
  }
  auto t = Trainer::Create(o);
  auto ref = Trainer::Create(o);
  ASSERT_TRUE(t.ok() && ref.ok());
  ASSERT_EQ(RunSteps(t->get(), 2).size(), 2u);
  ASSERT_TRUE((*t)->Export(TempPath("nan_before")).ok());
  float* row = (*t)->model().params().embed_tokens.data() + 63 * o.model.hidden_size;
  const float saved = row[5];
  row[5] = std::nanf("");
  const ModelParams before = (*t)->params();

  auto r = (*t)->Step();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("step 2: loss is nan (micro-batch 2 of 2)"));
  EXPECT_EQ((*t)->step(), 2);
  EXPECT_TRUE(SameWeights(o.model, before, (*t)->params()));
  ASSERT_TRUE((*t)->Export(TempPath("nan_after")).ok());
  EXPECT_EQ(FileBytes(TempPath("nan_before/optimizer.safetensors")),
            FileBytes(TempPath("nan_after/optimizer.safetensors")));

  // With the weight repaired the run continues exactly as one that never saw the NaN.
  row[5] = saved;
  const std::vector<double> expected = RunSteps(ref->get(), 3);
  auto r2 = (*t)->Step();
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->step, 2);
  EXPECT_EQ(r2->loss, expected[2]);
  EXPECT_TRUE(SameWeights(o.model, (*ref)->params(), (*t)->params()));
}

TEST(TrainerTest, HugeLearningRateDivergesWithError) {
  TrainerOptions o = SmallOptions(false);
  o.optimizer.lr = 1e36;
  o.optimizer.warmup_steps = 0;
  o.optimizer.grad_clip = 0;
  auto t = Trainer::Create(o);
  ASSERT_TRUE(t.ok());
  absl::Status error;
  int64_t ok_steps = 0;
  for (; ok_steps < 5; ++ok_steps) {
    const ModelParams before = (*t)->params();
    auto r = (*t)->Step();
    if (!r.ok()) {
      error = r.status();
      EXPECT_TRUE(SameWeights(o.model, before, (*t)->params()));
      break;
    }
  }
  ASSERT_LT(ok_steps, 5) << "training with lr 1e36 never failed";
  EXPECT_GE(ok_steps, 1);
  EXPECT_EQ(error.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(error.message()), HasSubstr(absl::StrCat("step ", ok_steps, ": ")));
  EXPECT_THAT(std::string(error.message()), ::testing::ContainsRegex("(loss|gradient norm) is"));
  EXPECT_EQ((*t)->step(), ok_steps);
}

// A finite loss with a non-finite gradient is hard to provoke through the model (an overflow
// large enough for the backward also breaks the forward), so the check is tested directly.
TEST(TrainerTest, NonFiniteGradNormNamesStepAndTensor) {
  const ModelConfig c = SmallOptions(false).model;
  ModelParams g = AllocateParams<float>(c);
  const auto grads = NamedTensors(c, &g);
  EXPECT_TRUE(CheckGradNormFinite(3, 1.5, 2.0, grads).ok());
  g.layers[1].up_proj[7] = -std::numeric_limits<float>::infinity();
  g.lm_head[0] = std::nanf("");
  absl::Status s = CheckGradNormFinite(17, std::nan(""), 4.25, grads);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("step 17: gradient norm is nan (loss 4.25; first non-finite gradient in "
                        "model.layers.1.mlp.up_proj.weight)"));
  s = CheckGradNormFinite(0, std::numeric_limits<double>::infinity(), 1, grads);
  EXPECT_THAT(std::string(s.message()), HasSubstr("step 0: gradient norm is inf"));
}

TEST(InitTest, NormalInitStatistics) {
  ModelConfig c = SmallOptions(false).model;
  c.hidden_size = 64;
  c.vocab_size = 1000;
  ModelParams p;
  InitParams(c, 1, &p);
  double s = 0, s2 = 0;
  for (float x : p.embed_tokens) {
    s += x;
    s2 += x * x;
  }
  const double n = static_cast<double>(p.embed_tokens.size());
  EXPECT_NEAR(s / n, 0.0, 0.002);
  EXPECT_NEAR(std::sqrt(s2 / n), 0.05, 0.002);
  EXPECT_EQ(p.norm[0], 1.0f);
  EXPECT_EQ(p.layers[1].input_layernorm[3], 1.0f);
  ModelParams q;
  InitParams(c, 1, &q);
  EXPECT_TRUE(SameWeights(c, p, q));
}

}  // namespace
}  // namespace lumen::engine
