#include "worker/engine/checkpoint.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/json.h"
#include "worker/engine/safetensors.h"
#include "worker/engine/trainer.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

std::string TempDir(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
  std::filesystem::remove_all(path);
  return path;
}

ModelConfig SmallConfig() {
  ModelConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 64;  // embed_tokens and lm_head are 8192 bytes each
  c.max_position_embeddings = 32;
  return c;
}

ModelParams RandomParams(const ModelConfig& c) {
  ModelParams p;
  InitParams(c, 9, &p);
  std::mt19937 rng(4);
  for (float& x : p.norm) x = static_cast<float>(rng() % 1000) / 500.0f;  // not all ones
  return p;
}

bool BitIdentical(const ModelConfig& c, const ModelParams& a, const ModelParams& b) {
  auto ta = NamedTensors(c, const_cast<ModelParams*>(&a));
  auto tb = NamedTensors(c, const_cast<ModelParams*>(&b));
  if (ta.size() != tb.size()) return false;
  for (size_t i = 0; i < ta.size(); ++i) {
    if (ta[i].data->size() != tb[i].data->size() ||
        std::memcmp(ta[i].data->data(), tb[i].data->data(), 4 * ta[i].data->size()) != 0) {
      return false;
    }
  }
  return true;
}

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    out.insert(e.path().filename().string());
  }
  return out;
}

std::string ReadAll(const std::string& path) {
  std::string text;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return text;
  char buf[4096];
  size_t r;
  while ((r = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, r);
  std::fclose(f);
  return text;
}

void WriteAll(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
}

TEST(CheckpointTest, DefaultShardSizeIsHuggingFaceTwoGB) {
  EXPECT_EQ(kDefaultMaxShardBytes, int64_t{2} * 1000 * 1000 * 1000);
}

TEST(CheckpointTest, SmallModelIsOneFileWithoutIndex) {
  const ModelConfig c = SmallConfig();
  const ModelParams p = RandomParams(c);
  const std::string dir = TempDir("single");
  ASSERT_TRUE(ExportHfDirectory(dir, c, p).ok());
  EXPECT_EQ(Files(dir), (std::set<std::string>{"config.json", "model.safetensors"}));
  ModelParams q;
  ASSERT_TRUE(LoadWeights(dir, c, &q).ok());
  EXPECT_TRUE(BitIdentical(c, p, q));
}

TEST(CheckpointTest, ShardedExportRoundTripsBitIdentically) {
  for (bool tied : {false, true}) {
    ModelConfig c = SmallConfig();
    c.tie_word_embeddings = tied;
    const ModelParams p = RandomParams(c);
    const std::string dir = TempDir(tied ? "sharded_tied" : "sharded");
    constexpr int64_t kMax = 10000;
    ASSERT_TRUE(ExportHfDirectory(dir, c, p, kMax).ok());
    const std::set<std::string> files = Files(dir);
    EXPECT_EQ(files.count("model.safetensors"), 0u);
    ASSERT_EQ(files.count("model.safetensors.index.json"), 1u);

    auto index = ParseJson(ReadAll(dir + "/model.safetensors.index.json"));
    ASSERT_TRUE(index.ok()) << index.status();
    const JsonValue* total = index->Find("metadata") ? index->Find("metadata")->Find("total_size")
                                                     : nullptr;
    int64_t total_size = 0;
    ASSERT_TRUE(total != nullptr && total->AsInt64(&total_size));
    EXPECT_EQ(total_size, ParameterCount(c) * 4);
    const JsonValue* map = index->Find("weight_map");
    ASSERT_NE(map, nullptr);
    ModelParams copy = p;
    const auto tensors = NamedTensors(c, &copy);
    ASSERT_EQ(map->object.size(), tensors.size());
    std::set<std::string> shard_files;
    for (const auto& [name, file] : map->object) shard_files.insert(file.text);
    const int n = static_cast<int>(shard_files.size());
    ASSERT_GT(n, 2);
    // Names follow model-0000i-of-0000N.safetensors; every shard respects the limit (no tensor
    // here exceeds it) and holds what the index says, in order.
    int64_t seen = 0;
    for (int i = 1; i <= n; ++i) {
      char name[64];
      std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", i, n);
      ASSERT_EQ(shard_files.count(name), 1u) << name;
      auto st = ReadSafetensors(dir + "/" + name);
      ASSERT_TRUE(st.ok()) << st.status();
      EXPECT_EQ(st->metadata.at("format"), "pt");
      int64_t bytes = 0;
      for (const auto& [tname, t] : st->tensors) {
        bytes += static_cast<int64_t>(t.data.size()) * 4;
        EXPECT_EQ(map->Find(tname)->text, name) << tname;
      }
      EXPECT_LE(bytes, kMax);
      seen += static_cast<int64_t>(st->tensors.size());
    }
    EXPECT_EQ(seen, static_cast<int64_t>(tensors.size()));
    EXPECT_EQ(files.size(), shard_files.size() + 2);  // + index + config.json

    ModelParams q;
    ASSERT_TRUE(LoadWeights(dir, c, &q).ok());
    EXPECT_TRUE(BitIdentical(c, p, q));
  }
}

TEST(CheckpointTest, TensorLargerThanLimitGetsItsOwnShard) {
  const ModelConfig c = SmallConfig();
  const ModelParams p = RandomParams(c);
  const std::string dir = TempDir("big_tensor");
  ASSERT_TRUE(ExportHfDirectory(dir, c, p, 5000).ok());  // embed_tokens is 8192 bytes
  auto index = ParseJson(ReadAll(dir + "/model.safetensors.index.json"));
  ASSERT_TRUE(index.ok());
  const std::string first = index->Find("weight_map")->Find("model.embed_tokens.weight")->text;
  EXPECT_THAT(first, ::testing::StartsWith("model-00001-of-"));
  auto st = ReadSafetensors(dir + "/" + first);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->tensors.size(), 1u);
  ModelParams q;
  ASSERT_TRUE(LoadWeights(dir, c, &q).ok());
  EXPECT_TRUE(BitIdentical(c, p, q));
}

TEST(CheckpointTest, ReexportSwitchesLayoutAndRemovesStaleFiles) {
  const ModelConfig c = SmallConfig();
  const ModelParams p = RandomParams(c);
  ModelParams p2 = p;
  p2.norm[0] = 42.0f;
  const std::string dir = TempDir("switch");
  ASSERT_TRUE(ExportHfDirectory(dir, c, p).ok());
  ASSERT_TRUE(ExportHfDirectory(dir, c, p2, 10000).ok());
  EXPECT_EQ(Files(dir).count("model.safetensors"), 0u);  // it would shadow the shards
  ModelParams q;
  ASSERT_TRUE(LoadWeights(dir, c, &q).ok());
  EXPECT_TRUE(BitIdentical(c, p2, q));
  ASSERT_TRUE(ExportHfDirectory(dir, c, p, 20000).ok());  // fewer shards: old names go
  ASSERT_TRUE(ExportHfDirectory(dir, c, p).ok());
  EXPECT_EQ(Files(dir), (std::set<std::string>{"config.json", "model.safetensors"}));
  ASSERT_TRUE(LoadWeights(dir, c, &q).ok());
  EXPECT_TRUE(BitIdentical(c, p, q));
}

TEST(CheckpointTest, ShardedLoadErrorsNameIndexShardAndTensor) {
  const ModelConfig c = SmallConfig();
  const ModelParams p = RandomParams(c);
  const std::string dir = TempDir("bad_index");
  ASSERT_TRUE(ExportHfDirectory(dir, c, p, 10000).ok());
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string good = ReadAll(index_path);
  ModelParams q = p;
  q.norm[0] = -1.0f;
  const ModelParams before = q;
  auto with_index = [&](const std::string& text) {
    WriteAll(index_path, text);
    return LoadWeights(dir, c, &q);
  };
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return s;
  };

  // Missing entry.
  absl::Status s = with_index(replace("\"model.norm.weight\"", "\"model.norm.weight.x\""));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("weight_map has no entry for tensor model.norm.weight (shape [32])"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.safetensors.index.json"));

  // Entry pointing at a file that does not exist.
  auto idx = ParseJson(good);
  ASSERT_TRUE(idx.ok());
  const std::string norm_file = idx->Find("weight_map")->Find("model.norm.weight")->text;
  const std::string embed_file = idx->Find("weight_map")->Find("model.embed_tokens.weight")->text;
  ASSERT_NE(norm_file, embed_file);
  s = with_index(replace("\"model.norm.weight\": \"" + norm_file + "\"",
                         "\"model.norm.weight\": \"model-00099-of-00099.safetensors\""));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model-00099-of-00099.safetensors"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.norm.weight"));

  // Entry pointing at the wrong shard.
  s = with_index(replace("\"model.norm.weight\": \"" + norm_file + "\"",
                         "\"model.norm.weight\": \"" + embed_file + "\""));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(embed_file + ": tensor model.norm.weight (shape [32]) is missing"));

  // Path escaping the directory, malformed JSON, no weight_map.
  s = with_index(replace("\"" + norm_file + "\"", "\"../" + norm_file + "\""));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("is not a file name in the directory"));
  s = with_index(good.substr(0, good.size() / 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.safetensors.index.json: "));
  s = with_index("{\"metadata\": {}}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"weight_map\" is missing"));
  EXPECT_TRUE(BitIdentical(c, before, q));  // unchanged on every error

  // A truncated shard names the shard and a tensor the index places there.
  WriteAll(index_path, good);
  std::filesystem::resize_file(dir + "/" + norm_file, 20);
  s = LoadWeights(dir, c, &q);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr(norm_file));

  // Neither layout present.
  const std::string empty = TempDir("empty_export");
  std::filesystem::create_directories(empty);
  s = LoadWeights(empty, c, &q);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("holds neither model.safetensors nor model.safetensors.index.json"));
  EXPECT_TRUE(BitIdentical(c, before, q));
}

// A source hands over one tensor at a time (state that lives on a device or in the memstore):
// the files are byte for byte those written from a ModelParams, sharded or not, and a
// source's error is returned with no file left behind.
TEST(CheckpointTest, StreamedExportAndOptimizerStateMatchTheInMemoryOnes) {
  const ModelConfig c = SmallConfig();
  const ModelParams p = RandomParams(c);
  ModelParams m = RandomParams(c), v = RandomParams(c);
  for (float& x : v.embed_tokens) x = x * x;
  auto source = [&c](const ModelParams& params) {
    std::map<std::string, const std::vector<float>*> tensors;
    for (const NamedTensor<float>& t : NamedTensors(c, const_cast<ModelParams*>(&params))) {
      tensors[t.name] = t.data;
    }
    return TensorSource([tensors](const std::string& name, float* dst) {
      const std::vector<float>* data = tensors.at(name);
      std::copy(data->begin(), data->end(), dst);
      return absl::OkStatus();
    });
  };
  for (int64_t max_shard : {kDefaultMaxShardBytes, int64_t{10000}}) {
    const std::string a = TempDir("in_memory"), b = TempDir("streamed");
    ASSERT_TRUE(ExportHfDirectory(a, c, p, max_shard).ok());
    ASSERT_TRUE(ExportHfDirectory(b, c, source(p), max_shard).ok());
    EXPECT_EQ(Files(a), Files(b));
    EXPECT_GT(Files(a).size(), max_shard == 10000 ? 3u : 1u);
    for (const std::string& f : Files(a)) {
      EXPECT_EQ(ReadAll(a + "/" + f), ReadAll(b + "/" + f)) << f;
    }
  }
  const std::string dir = TempDir("moments");
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(SaveOptimizerState(dir + "/a.safetensors", c, m, v, 17).ok());
  ASSERT_TRUE(SaveOptimizerState(dir + "/b.safetensors", c, source(m), source(v), 17).ok());
  EXPECT_EQ(ReadAll(dir + "/a.safetensors"), ReadAll(dir + "/b.safetensors"));

  // Read back one parameter at a time, and whole.
  auto reader = OptimizerStateReader::Open(dir + "/b.safetensors", c);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->step(), 17);
  std::vector<float> rm(v.embed_tokens.size()), rv(v.embed_tokens.size());
  ASSERT_TRUE((*reader)->Read("model.embed_tokens.weight", rm.data(), rv.data()).ok());
  EXPECT_EQ(rm, m.embed_tokens);
  EXPECT_EQ(rv, v.embed_tokens);
  ModelParams lm, lv;
  int64_t step = 0;
  ASSERT_TRUE(LoadOptimizerState(dir + "/b.safetensors", c, &lm, &lv, &step).ok());
  EXPECT_TRUE(BitIdentical(c, m, lm));
  EXPECT_TRUE(BitIdentical(c, v, lv));
  EXPECT_EQ(step, 17);
  EXPECT_EQ(*OptimizerStateStep(dir + "/b.safetensors", c), 17);
  // Another model's state is refused, naming the tensor.
  ModelConfig other = c;
  other.intermediate_size = 64;
  auto wrong = OptimizerStateReader::Open(dir + "/b.safetensors", other);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(std::string(wrong.status().message()),
              HasSubstr("tensor model.layers.0.mlp.gate_proj.weight.exp_avg has shape [48, 32], "
                        "the model needs [64, 32]"));

  // A source that fails: its error, and no file.
  const TensorSource failing = [](const std::string& name, float*) {
    return name == "model.norm.weight" ? absl::UnavailableError("memstore gone")
                                       : absl::OkStatus();
  };
  const absl::Status s = SaveOptimizerState(dir + "/c.safetensors", c, failing, failing, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(std::filesystem::exists(dir + "/c.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/c.safetensors.tmp"));
}

TEST(CheckpointTest, NonPositiveShardLimitIsRejected) {
  const ModelConfig c = SmallConfig();
  absl::Status s = ExportHfDirectory(TempDir("zero"), c, RandomParams(c), 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_shard_bytes 0 must be > 0"));
}

}  // namespace
}  // namespace lumen::engine
