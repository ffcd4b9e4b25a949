// Parity of the C++ engine with a plain PyTorch implementation (torch_reference.py, run with
// Debian's /usr/bin/python3): per-step losses over 20 steps, final weights, and the logits of
// an exported directory. Skips (and says why on stdout) when torch is not importable.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/safetensors.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {
namespace {

constexpr char kPython[] = "/usr/bin/python3";

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

std::string ScriptPath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  if (srcdir != nullptr) {
    const char* ws = std::getenv("TEST_WORKSPACE");
    return absl::StrCat(srcdir, "/", ws != nullptr ? ws : "lumen",
                        "/worker/engine/torch_reference.py");
  }
  const char* env = std::getenv("TORCH_REFERENCE");
  return env != nullptr ? env : "worker/engine/torch_reference.py";
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs a shell command, returns its exit status; stdout/stderr go to files under TempDir.
int RunCommand(const std::string& cmd, const std::string& tag) {
  const std::string full = absl::StrCat(cmd, " > ", TempDir(), "/", tag, ".out 2> ", TempDir(),
                                        "/", tag, ".err");
  return std::system(full.c_str());
}

bool TorchAvailable(std::string* why) {
  if (RunCommand(absl::StrCat(kPython, " -c 'import torch, numpy'"), "probe") != 0) {
    *why = absl::StrCat(kPython, " cannot import torch/numpy: ",
                        ReadFile(TempDir() + "/probe.err"));
    return false;
  }
  return true;
}

std::string WriteTokens(int64_t n, int64_t vocab) {
  std::mt19937_64 rng(2024);
  std::vector<uint16_t> toks(n);
  for (int64_t i = 0; i < n; ++i) {
    toks[i] = static_cast<uint16_t>(rng() % 3 == 0 ? rng() % vocab : (i * 13 + i / 7) % vocab);
  }
  const std::string path = TempDir() + "/parity_tokens.bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(toks.data(), 2, toks.size(), f);
  std::fclose(f);
  return path;
}

TrainerOptions ParityOptions(bool tied) {
  TrainerOptions o;
  o.model.hidden_size = 64;
  o.model.intermediate_size = 160;
  o.model.num_hidden_layers = 2;
  o.model.num_attention_heads = 4;
  o.model.num_key_value_heads = 2;
  o.model.vocab_size = 256;
  o.model.max_position_embeddings = 64;
  o.model.rope_theta = 10000.0;
  o.model.rms_norm_eps = 1e-5;
  o.model.tie_word_embeddings = tied;
  o.model.init_std = 0.05;
  o.optimizer.lr = 3e-3;
  o.optimizer.beta1 = 0.9;
  o.optimizer.beta2 = 0.95;
  o.optimizer.eps = 1e-8;
  o.optimizer.weight_decay = 0.1;
  o.optimizer.grad_clip = 1.0;
  o.optimizer.schedule = ScheduleKind::kCosine;
  o.optimizer.warmup_steps = 4;
  o.optimizer.min_lr = 3e-4;
  o.train.steps = 20;
  o.train.seq_len = 32;
  o.train.micro_batch_size = 4;
  o.train.grad_accum_steps = 2;
  o.train.seed = 11;
  o.data.path = WriteTokens(20000, 256);
  o.num_threads = 2;
  return o;
}

std::string TrainArgs(const TrainerOptions& o) {
  return absl::StrCat(
      " --data ", o.data.path, " --dtype uint16 --steps ", o.train.steps, " --seq-len ",
      o.train.seq_len, " --micro-batch ", o.train.micro_batch_size, " --grad-accum ",
      o.train.grad_accum_steps, " --lr ", o.optimizer.lr, " --beta1 ", o.optimizer.beta1,
      " --beta2 ", o.optimizer.beta2, " --eps ", o.optimizer.eps, " --weight-decay ",
      o.optimizer.weight_decay, " --grad-clip ", o.optimizer.grad_clip, " --schedule ",
      o.optimizer.schedule == ScheduleKind::kCosine ? "cosine" : "constant", " --warmup ",
      o.optimizer.warmup_steps, " --min-lr ", o.optimizer.min_lr);
}

double RelDiff(const std::vector<float>& a, const std::vector<float>& ref) {
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    r += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(d) / std::max(std::sqrt(r), 1e-30);
}

class ParityTest : public ::testing::TestWithParam<bool> {};

TEST_P(ParityTest, TwentyStepsMatchPyTorch) {
  std::string why;
  if (!TorchAvailable(&why)) {
    std::printf("SKIPPED: %s\n", why.c_str());
    GTEST_SKIP() << why;
  }
  const bool tied = GetParam();
  const std::string tag = tied ? "tied" : "untied";
  TrainerOptions o = ParityOptions(tied);
  auto trainer = Trainer::Create(o);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::string init_dir = TempDir() + "/init_" + tag;
  ASSERT_TRUE((*trainer)->Export(init_dir).ok());

  const std::string ref_weights = TempDir() + "/ref_weights_" + tag + ".safetensors";
  const int rc = RunCommand(absl::StrCat(kPython, " ", ScriptPath(), " train --model-dir ", init_dir,
                                  TrainArgs(o), " --out-weights ", ref_weights),
                     "train_" + tag);
  ASSERT_EQ(rc, 0) << ReadFile(TempDir() + "/train_" + tag + ".err");
  std::vector<double> ref_loss, ref_norm;
  {
    std::istringstream in(ReadFile(TempDir() + "/train_" + tag + ".out"));
    std::string w1, w2, w3, w4;
    int64_t s;
    double loss, lr, gn;
    while (in >> w1 >> s >> w2 >> loss >> w3 >> lr >> w4 >> gn) {
      ref_loss.push_back(loss);
      ref_norm.push_back(gn);
    }
  }
  ASSERT_EQ(ref_loss.size(), 20u);

  double max_loss_rel = 0, max_norm_rel = 0;
  for (int s = 0; s < 20; ++s) {
    auto r = (*trainer)->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    const double rel = std::abs(r->loss - ref_loss[s]) / std::abs(ref_loss[s]);
    max_loss_rel = std::max(max_loss_rel, rel);
    max_norm_rel = std::max(max_norm_rel, std::abs(r->grad_norm - ref_norm[s]) / ref_norm[s]);
    EXPECT_LE(rel, 1e-5) << "step " << s << " ours " << r->loss << " torch " << ref_loss[s];
  }
  EXPECT_LT(ref_loss.back(), ref_loss.front() - 0.1);  // the run actually trains

  auto ref = ReadSafetensors(ref_weights);
  ASSERT_TRUE(ref.ok()) << ref.status();
  double max_w_rel = 0;
  std::string worst;
  for (const NamedTensor<float>& t :
       NamedTensors(o.model, const_cast<ModelParams*>(&(*trainer)->params()))) {
    auto it = ref->tensors.find(t.name);
    ASSERT_NE(it, ref->tensors.end()) << t.name;
    const double rel = RelDiff(*t.data, it->second.data);
    if (rel > max_w_rel) {
      max_w_rel = rel;
      worst = t.name;
    }
  }
  EXPECT_LE(max_w_rel, 1e-4) << worst;

  // Logits of the trained model, exported, computed by PyTorch vs our forward.
  const std::string final_dir = TempDir() + "/final_" + tag;
  ASSERT_TRUE((*trainer)->Export(final_dir).ok());
  const int64_t batch = 2, seq = 32;
  std::vector<int32_t> ids(batch * seq);
  std::mt19937_64 rng(3);
  for (auto& x : ids) x = static_cast<int32_t>(rng() % o.model.vocab_size);
  const std::string logits_path = TempDir() + "/logits_" + tag + ".safetensors";
  ASSERT_EQ(RunCommand(absl::StrCat(kPython, " ", ScriptPath(), " logits --model-dir ", final_dir,
                             " --tokens ", absl::StrJoin(ids, ","), " --batch ", batch, " --out ",
                             logits_path),
                "logits_" + tag),
            0)
      << ReadFile(TempDir() + "/logits_" + tag + ".err");
  auto ref_logits = ReadSafetensors(logits_path);
  ASSERT_TRUE(ref_logits.ok()) << ref_logits.status();
  LlamaModel model(o.model, false, nullptr);
  ASSERT_TRUE(LoadWeights(final_dir, o.model, &model.params()).ok());
  std::vector<float> ours;
  ASSERT_TRUE(model.Logits(ids.data(), batch, seq, &ours).ok());
  ASSERT_EQ(ours.size(), ref_logits->tensors.at("logits").data.size());
  const double logits_rel = RelDiff(ours, ref_logits->tensors.at("logits").data);
  EXPECT_LE(logits_rel, 1e-4);

  std::printf("[parity %s] max step-loss rel diff %.3g, max grad-norm rel diff %.3g, "
              "max final-weight rel diff %.3g (%s), logits rel diff %.3g, loss %.4f -> %.4f\n",
              tag.c_str(), max_loss_rel, max_norm_rel, max_w_rel, worst.c_str(), logits_rel,
              ref_loss.front(), ref_loss.back());
}

INSTANTIATE_TEST_SUITE_P(UntiedAndTied, ParityTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? "Tied" : "Untied";
                         });

}  // namespace
}  // namespace lumen::engine
