#include "coordinator/job_spec.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

class JobSpecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp";
    std::vector<uint16_t> tokens(4096);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = i % 251;
    std::ofstream(dir_ + "/train.bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
    std::ofstream(dir_ + "/odd.bin", std::ios::binary).write("abc", 3);
  }

  std::string Spec(const std::string& extra_model = "", const std::string& rest = "") {
    return "name: t\nmodel: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
           "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 256, "
           "max_position_embeddings: 64" +
           extra_model +
           "}\n"
           "data: {path: train.bin, token_dtype: uint16}\n"
           "train: {steps: 3, seq_len: 16, micro_batch_size: 2}\n"
           "optimizer: {lr: 1.0e-3}\n" +
           rest;
  }

  std::string dir_;
};

TEST_F(JobSpecTest, AppliesDefaultsAndResolvesPaths) {
  auto spec = ResolveJobSpec(Spec(), dir_, NodeLimits{});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->data().path(), dir_ + "/train.bin");
  EXPECT_EQ(spec->data().order(), DATA_ORDER_SEQUENTIAL);
  EXPECT_EQ(spec->train().grad_accum_steps(), 1);
  ASSERT_EQ(spec->optimizer().betas_size(), 2);
  EXPECT_DOUBLE_EQ(spec->optimizer().betas(1), 0.999);
  EXPECT_DOUBLE_EQ(spec->model().rope_theta(), 10000.0);
  EXPECT_EQ(spec->resources().workers(), 1);
  EXPECT_EQ(spec->resources().precision(), PRECISION_FP32);
}

TEST_F(JobSpecTest, ResumeFromIsACheckpointDirectoryRelativeToTheSpec) {
  std::filesystem::create_directories(dir_ + "/ckpt/step-5");
  std::ofstream(dir_ + "/ckpt/step-5/optimizer.safetensors") << "x";
  auto spec = ResolveJobSpec(Spec("", "resume_from: ckpt/step-5\n"), dir_, NodeLimits{});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->resume_from(), dir_ + "/ckpt/step-5");
}

TEST_F(JobSpecTest, PrecisionIsTheNodeDevices) {
  NodeLimits gpus;
  gpus.has_cuda = true;
  auto spec = ResolveJobSpec(Spec(), dir_, gpus);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->resources().precision(), PRECISION_BF16);
  spec = ResolveJobSpec(Spec("", "resources: {precision: bf16}\n"), dir_, gpus);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->resources().precision(), PRECISION_BF16);
  // GPU workers train in bf16 only: asking for fp32 there is refused, not quietly changed.
  spec = ResolveJobSpec(Spec("", "resources: {precision: fp32}\n"), dir_, gpus);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()),
              HasSubstr("resources.precision: fp32: this node's workers are cuda"));
}

TEST_F(JobSpecTest, PresetFieldsCanBeOverridden) {
  auto spec = ResolveJobSpec(
      "model: {preset: tiny, num_hidden_layers: 3}\n"
      "data: {path: train.bin, token_dtype: uint16}\n"
      "train: {steps: 1, seq_len: 16, micro_batch_size: 1}\noptimizer: {lr: 1.0e-3}\n",
      dir_, NodeLimits{});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().hidden_size(), 64);
  EXPECT_EQ(spec->model().num_hidden_layers(), 3);
}

TEST(ParameterCountTest, MatchesPublishedSizes) {
  // Llama 3 8B has 8,030,261,248 parameters; 70B has 70,553,706,496.
  EXPECT_EQ(ParameterCount(*ModelPreset("llama3-8b")), 8030261248);
  EXPECT_EQ(ParameterCount(*ModelPreset("llama3-70b")), 70553706496);
  const int64_t big = ParameterCount(*ModelPreset("lumen-104b"));
  EXPECT_GT(big, 103'000'000'000);
  EXPECT_LT(big, 106'000'000'000);
}

TEST_F(JobSpecTest, RejectsEachBadFieldByName) {
  struct Case {
    std::string yaml;
    std::string fragment;
  } cases[] = {
      {Spec(", num_attention_heads: 6"),
       "model.num_attention_heads: 6 does not divide model.hidden_size 64"},
      {Spec(", num_key_value_heads: 3"),
       "model.num_key_value_heads: 3 does not divide model.num_attention_heads 4"},
      {Spec(", hidden_size: -64"), "model.hidden_size: -64 must be positive"},
      {Spec(", rms_norm_eps: 0"), "model.rms_norm_eps"},
      {Spec(", preset: huge"), "model.preset: unknown preset 'huge'"},
      {Spec(", max_position_embeddings: 8"), "train.seq_len: 16 exceeds"},
      {Spec("", "resources: {workers: 2}\n"), "resources.workers"},
      {Spec("", "resources: {precision: bf16}\n"), "resources.precision: bf16 needs a CUDA"},
      {Spec("", "checkpoint: {every_steps: -1}\n"), "checkpoint.every_steps"},
      {Spec("", "init_from: /no/such/model.safetensors\n"), "init_from: /no/such"},
      {Spec("", "resume_from: /no/such/step-5\n"), "resume_from: /no/such/step-5: No such"},
      {Spec("", "resume_from: .\n"), "is not a checkpoint directory"},
      {Spec("", "resume_from: .\ninit_from: train.bin\n"), "resume_from: and init_from both"},
      {Spec("", "name: 'bad name!'\n"), "name: 'bad name!'"},
  };
  for (const Case& c : cases) {
    auto spec = ResolveJobSpec(c.yaml, dir_, NodeLimits{});
    ASSERT_FALSE(spec.ok()) << c.yaml;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(spec.status().message()), HasSubstr(c.fragment)) << c.yaml;
  }
}

// On a node of 4 workers a job may train on several (data parallel), each at least one
// micro-batch a step; a GPU node trains a job on one worker so far.
TEST_F(JobSpecTest, JobOnSeveralWorkersSharesItsMicroBatches) {
  auto yaml = [](int workers, int micro_batches) {
    return absl::StrCat(
        "name: t\nmodel: {preset: tiny}\ndata: {path: train.bin, token_dtype: uint16}\n"
        "train: {steps: 3, seq_len: 16, micro_batch_size: 2, grad_accum_steps: ",
        micro_batches, "}\noptimizer: {lr: 1.0e-3}\nresources: {workers: ", workers, "}\n");
  };
  NodeLimits four;
  four.workers = 4;
  auto two = ResolveJobSpec(yaml(2, 3), dir_, four);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->resources().workers(), 2);
  auto too_few = ResolveJobSpec(yaml(4, 3), dir_, four);
  EXPECT_EQ(too_few.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_few.status().message()),
              HasSubstr("train.grad_accum_steps: 3 micro-batches a step cannot be shared by "
                        "resources.workers 4"));
  EXPECT_THAT(std::string(ResolveJobSpec(yaml(5, 8), dir_, four).status().message()),
              HasSubstr("resources.workers: 5 must be between 1 and this node's 4 workers"));
  // GPU nodes too (the workers check that each replica fits its GPU).
  NodeLimits gpus = four;
  gpus.has_cuda = true;
  auto on_gpus = ResolveJobSpec(yaml(2, 4), dir_, gpus);
  ASSERT_TRUE(on_gpus.ok()) << on_gpus.status();
  EXPECT_EQ(on_gpus->resources().workers(), 2);
}

TEST_F(JobSpecTest, RejectsBadTrainOptimizerAndData) {
  const std::string model =
      "model: {preset: tiny}\n";
  struct Case {
    std::string yaml;
    std::string fragment;
  } cases[] = {
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: -5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "train.steps: -5 must be positive"},
      {model + "data: {path: missing.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "data.path: " + dir_ + "/missing.bin: No such file"},
      {model + "data: {path: odd.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "data.token_dtype: the size of"},
      {model + "data: {path: train.bin}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "data.token_dtype: is required"},
      {"model: {preset: tiny, vocab_size: 100}\ndata: {path: train.bin, token_dtype: uint16}\n"
       "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "is not below model.vocab_size 100"},
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\n"
               "optimizer: {lr: 0.1, betas: [0.9]}\n",
       "optimizer.betas: needs exactly 2 values"},
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\n"
               "optimizer: {lr: 0.1, betas: [0.9, 1.5]}\n",
       "optimizer.betas[1]: 1.5 must be in [0, 1)"},
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\n"
               "optimizer: {lr: 0.1, schedule: {kind: cosine, warmup_steps: 10}}\n",
       "optimizer.schedule.warmup_steps: 10 must be in [0, train.steps = 5]"},
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 16, micro_batch_size: 2}\noptimizer: {lr: -1}\n",
       "optimizer.lr: -1 must be positive"},
      {model + "data: {path: train.bin, token_dtype: uint16}\n"
               "train: {steps: 5, seq_len: 4000, micro_batch_size: 2}\noptimizer: {lr: 0.1}\n",
       "train.seq_len: 4000 exceeds"},
  };
  for (const Case& c : cases) {
    auto spec = ResolveJobSpec(c.yaml, dir_, NodeLimits{});
    ASSERT_FALSE(spec.ok()) << c.yaml;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(spec.status().message()), HasSubstr(c.fragment)) << c.yaml;
  }
}

}  // namespace
}  // namespace lumen
