// The streamed CUDA trainer's host side on the CPU: its AdamW against the engine's on the same
// tensors, master weights and moments in a TensorHome, the embedding's rows split and
// gathered, the embedding's gradient from the tokens' input gradients, and the job queue.
#include "worker/cuda/host_state.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/checkpoint.h"
#include "worker/engine/model.h"
#include "worker/engine/optimizer.h"
#include "worker/engine/tensor_home.h"
#include "worker/engine/thread_pool.h"
#include "worker/engine/trainer.h"

namespace lumen::cuda {
namespace {

using ::testing::HasSubstr;

engine::ModelConfig Config(bool tied) {
  engine::ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 176;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 256;
  c.max_position_embeddings = 64;
  c.tie_word_embeddings = tied;
  return c;
}

engine::ModelParams RandomParams(const engine::ModelConfig& c, uint64_t seed, float scale) {
  engine::ModelParams p = engine::AllocateParams<float>(c);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for (auto& t : engine::NamedTensors(c, &p)) {
    for (float& x : *t.data) x = normal(rng);
  }
  return p;
}

// The pinned buffers the trainer would own, as plain vectors.
struct Buffers {
  explicit Buffers(const engine::ModelConfig& c) {
    for (const TensorGroupShape& s : TensorGroupShapes(c)) {
      params.emplace_back(s.elems, 0);
      grads.emplace_back(s.elems, 0.0f);
    }
  }
  std::vector<HostGroupBuffers> Views() {
    std::vector<HostGroupBuffers> v;
    for (size_t g = 0; g < params.size(); ++g) v.push_back({params[g].data(), grads[g].data()});
    return v;
  }
  std::vector<std::vector<uint16_t>> params;
  std::vector<std::vector<float>> grads;
};

engine::AdamWHyper Hyper() {
  engine::AdamWHyper h;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  return h;
}

// The engine's update of every tensor (weight decay on matrices only), gradients scaled first.
void EngineAdamW(const engine::ModelConfig& c, engine::ModelParams* p, engine::ModelParams* g,
                 engine::ModelParams* m, engine::ModelParams* v, int64_t step, float coef) {
  auto ps = engine::NamedTensors(c, p);
  auto gs = engine::NamedTensors(c, g);
  auto ms = engine::NamedTensors(c, m);
  auto vs = engine::NamedTensors(c, v);
  for (size_t i = 0; i < ps.size(); ++i) {
    engine::AdamWHyper h = Hyper();
    if (ps[i].shape.size() < 2) h.weight_decay = 0;
    for (float& x : *gs[i].data) x *= coef;
    engine::AdamWUpdate(ps[i].data->data(), gs[i].data->data(), ms[i].data->data(),
                        vs[i].data->data(), static_cast<int64_t>(ps[i].data->size()), h, step);
  }
}

void ExpectSame(const engine::ModelConfig& c, engine::ModelParams a, engine::ModelParams b,
                const std::string& what) {
  auto at = engine::NamedTensors(c, &a);
  auto bt = engine::NamedTensors(c, &b);
  ASSERT_EQ(at.size(), bt.size());
  for (size_t i = 0; i < at.size(); ++i) {
    EXPECT_EQ(*at[i].data, *bt[i].data) << what << " " << at[i].name;
  }
}

// Runs three steps on the host state (gradients copied into its buffers, clipped by `coef` on
// the second) and on the engine, and expects the same weights, moments and bf16 copies.
void ExpectMatchesEngine(bool tied, engine::TensorHome* home) {
  const engine::ModelConfig c = Config(tied);
  engine::ThreadPool pool(3);
  Buffers buf(c);
  StateHome mh;
  mh.home = home;
  mh.prefix = "job/";
  mh.chunk_elems = 1000;  // many chunks a group, the last of each shorter
  auto state = HostTrainingState::Create(c, buf.Views(), mh, pool);
  ASSERT_TRUE(state.ok()) << state.status();
  engine::ModelParams p = RandomParams(c, 1, 0.02f);
  ASSERT_TRUE((*state)->SetParams(p, pool).ok());
  engine::ModelParams m = engine::AllocateParams<float>(c), v = engine::AllocateParams<float>(c);
  const size_t groups = (*state)->shapes().size();
  for (int64_t step = 1; step <= 3; ++step) {
    engine::ModelParams g = RandomParams(c, 100 + step, 1.0f);
    for (size_t k = 0; k < groups; ++k) {
      ASSERT_TRUE(CopyGroupTensors(c, &g, k, buf.grads[k].data(), true).ok());
    }
    const float coef = step == 2 ? 0.25f : 1.0f;
    EngineAdamW(c, &p, &g, &m, &v, step, coef);
    for (size_t k = 0; k < groups; ++k) {
      ASSERT_TRUE((*state)->AdamW(k, nullptr, Hyper(), step, coef, pool).ok());
    }
  }
  engine::ModelParams got;
  ASSERT_TRUE((*state)->GetParams(&got).ok());
  ExpectSame(c, got, p, "master");
  engine::ModelParams gm, gv;
  ASSERT_TRUE((*state)->GetMoments(&gm, &gv).ok());
  ExpectSame(c, gm, m, "m");
  ExpectSame(c, gv, v, "v");
  // A group at a time (how checkpoints are written and read): the same tensors, only that
  // group's filled; setting every group's moments back (scaled) is SetMoments.
  const std::map<std::string, size_t> group_of = TensorGroupOf(c);
  engine::ModelParams scaled_m = m, scaled_v = v;
  for (engine::ModelParams* x : {&scaled_m, &scaled_v}) {
    for (engine::NamedTensor<float>& t : engine::NamedTensors(c, x)) {
      for (float& f : *t.data) f *= 2;
    }
  }
  for (size_t k = 0; k < groups; ++k) {
    for (int which : {0, 1, 2}) {
      engine::ModelParams one;
      ASSERT_TRUE((*state)->GetGroup(which, k, &one).ok());
      engine::ModelParams& want = which == 0 ? p : which == 1 ? m : v;
      auto got_tensors = engine::NamedTensors(c, &one);
      auto want_tensors = engine::NamedTensors(c, &want);
      for (size_t i = 0; i < got_tensors.size(); ++i) {
        if (group_of.at(got_tensors[i].name) == k) {
          EXPECT_EQ(*got_tensors[i].data, *want_tensors[i].data) << got_tensors[i].name;
        } else {
          EXPECT_TRUE(got_tensors[i].data->empty()) << got_tensors[i].name << " group " << k;
        }
      }
    }
    ASSERT_TRUE((*state)->SetMomentsGroup(k, scaled_m, scaled_v).ok());
  }
  ASSERT_TRUE((*state)->GetMoments(&gm, &gv).ok());
  ExpectSame(c, gm, scaled_m, "m set a group at a time");
  ExpectSame(c, gv, scaled_v, "v set a group at a time");
  // The bf16 copies are the master weights rounded.
  for (size_t k = 0; k < groups; ++k) {
    std::vector<float> flat(buf.grads[k].size(), 0.0f);
    ASSERT_TRUE(CopyGroupTensors(c, &p, k, flat.data(), true).ok());
    for (size_t i = 0; i < flat.size(); ++i) {
      ASSERT_EQ(buf.params[k][i], ToBf16Bits(flat[i])) << "group " << k << " element " << i;
    }
  }
}

TEST(HostTrainingStateTest, AdamWMatchesTheEngine) {
  ExpectMatchesEngine(false, nullptr);
  ExpectMatchesEngine(true, nullptr);
}

TEST(HostTrainingStateTest, StateInAHomeGivesTheSameUpdates) {
  engine::MemoryTensorHome home;
  ExpectMatchesEngine(false, &home);
  // Freed with the state.
  EXPECT_EQ(home.num_tensors(), 0);
  ExpectMatchesEngine(true, &home);
  EXPECT_EQ(home.num_tensors(), 0);
  EXPECT_GT(home.bytes_in(), 0);
}

TEST(HostTrainingStateTest, StateInAHomeLivesInItsTier) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  Buffers buf(c);
  engine::MemoryTensorHome home;
  StateHome mh{&home, "j/", engine::HomeTier::kNvme};
  mh.chunk_elems = 4096;
  auto state = HostTrainingState::Create(c, buf.Views(), mh, pool);
  ASSERT_TRUE(state.ok()) << state.status();
  // Nothing is written before the weights are placed, and nothing can be read or updated.
  EXPECT_EQ(home.num_tensors(), 0);
  engine::ModelParams none;
  EXPECT_EQ((*state)->GetParams(&none).code(), absl::StatusCode::kFailedPrecondition);
  const absl::Status early = (*state)->AdamW(0, nullptr, Hyper(), 1, 1.0f, pool);
  EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition) << early;
  EXPECT_THAT(std::string(early.message()), HasSubstr("no weights"));
  ASSERT_TRUE((*state)->InitRandom(3, pool).ok());
  int64_t elems = 0, chunks = 0;
  for (const TensorGroupShape& s : (*state)->shapes()) {
    elems += s.elems;
    chunks += (s.elems + 4095) / 4096;
  }
  EXPECT_EQ(home.num_tensors(), 3 * chunks);
  EXPECT_EQ(home.bytes_stored(engine::HomeTier::kNvme), 12 * elems);
  for (const char* id : {"j/master/0/0", "j/m/0/0", "j/v/1/1"}) {
    engine::HomeTier tier;
    ASSERT_TRUE(home.TierOf(id, &tier).ok()) << id;
    EXPECT_EQ(tier, engine::HomeTier::kNvme) << id;
  }
  // The state keeps three chunks of the master weights and of each moment, not the state (on a
  // model larger than a chunk).
  engine::ModelConfig big = c;
  big.hidden_size = 4096;
  big.intermediate_size = 14336;
  big.num_attention_heads = 32;
  big.num_key_value_heads = 8;
  big.vocab_size = 128256;
  int64_t big_elems = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(big)) big_elems += s.elems;
  EXPECT_EQ(HostTrainingState::OwnBytes(big, false), 12 * big_elems);
  EXPECT_EQ(HostTrainingState::OwnBytes(big, true), 3 * 3 * 4 * StateHome().chunk_elems);
  EXPECT_EQ(HostTrainingState::HomeBytes(c), 12 * elems);
  // A home that fails is reported by the update that needed it.
  ASSERT_TRUE(home.Free("j/v/1/2").ok());
  const absl::Status s = (*state)->AdamW(1, nullptr, Hyper(), 1, 1.0f, pool);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
}

// Random or given weights placed in a home a chunk at a time (chunks that split tensors and
// the padding between them) are the values the state keeps in this process, and so are the
// bf16 copies, also when rewritten from the home.
TEST(HostTrainingStateTest, WeightsPlacedInAHomeEqualThoseKeptInThisProcess) {
  for (bool tied : {false, true}) {
    const engine::ModelConfig c = Config(tied);
    engine::ThreadPool pool(3);
    engine::MemoryTensorHome home;
    StateHome mh{&home, "j/", engine::HomeTier::kHost};
    mh.chunk_elems = 1000;
    Buffers a(c), b(c);
    auto sa = HostTrainingState::Create(c, a.Views(), {}, pool);
    auto sb = HostTrainingState::Create(c, b.Views(), mh, pool);
    ASSERT_TRUE(sa.ok() && sb.ok());
    engine::ModelParams ga, gb;
    ASSERT_TRUE((*sa)->InitRandom(7, pool).ok());
    ASSERT_TRUE((*sb)->InitRandom(7, pool).ok());
    ASSERT_TRUE((*sa)->GetParams(&ga).ok());
    ASSERT_TRUE((*sb)->GetParams(&gb).ok());
    ExpectSame(c, gb, ga, "InitRandom");
    EXPECT_EQ(a.params, b.params);
    engine::RandomWeights random(c, 13, &pool);
    engine::ModelParams p;
    engine::InitParams(c, 13, &p, &pool);
    ASSERT_TRUE((*sa)->SetParams(p, pool).ok());
    ASSERT_TRUE((*sb)->SetParams(random, pool).ok());
    ASSERT_TRUE((*sa)->GetParams(&ga).ok());
    ASSERT_TRUE((*sb)->GetParams(&gb).ok());
    ExpectSame(c, gb, ga, "SetParams");
    EXPECT_EQ(a.params, b.params);
    // A resume places the weights, then sets each group's moments: written once.
    engine::MemoryTensorHome resumed_home;
    StateHome rh{&resumed_home, "j/", engine::HomeTier::kHost};
    rh.chunk_elems = 1000;
    Buffers r(c);
    auto sr = HostTrainingState::Create(c, r.Views(), rh, pool);
    ASSERT_TRUE(sr.ok());
    engine::RandomWeights again(c, 13, &pool);
    ASSERT_TRUE((*sr)->SetParams(again, pool, /*zero_moments=*/false).ok());
    int64_t chunks = 0;
    for (const TensorGroupShape& sh : (*sr)->shapes()) chunks += (sh.elems + 999) / 1000;
    EXPECT_EQ(resumed_home.num_tensors(), chunks);  // the master weights only
    const engine::ModelParams m = RandomParams(c, 30, 0.01f), v = RandomParams(c, 31, 0.01f);
    for (size_t g = 0; g < r.params.size(); ++g) {
      ASSERT_TRUE((*sr)->SetMomentsGroup(g, m, v).ok());
    }
    EXPECT_EQ(resumed_home.num_tensors(), 3 * chunks);
    engine::ModelParams gm, gv;
    ASSERT_TRUE((*sr)->GetMoments(&gm, &gv).ok());
    ExpectSame(c, gm, m, "resumed m");
    ExpectSame(c, gv, v, "resumed v");
    for (std::vector<uint16_t>& x : b.params) std::fill(x.begin(), x.end(), 0x7fc0);
    for (size_t g = 0; g < b.params.size(); ++g) {
      ASSERT_TRUE((*sb)->RewriteBf16(g, pool).ok());
    }
    EXPECT_EQ(a.params, b.params);
  }
}

// A home whose writes start failing after `ok_puts` of them.
class FailingHome : public engine::MemoryTensorHome {
 public:
  explicit FailingHome(int ok_puts) : ok_puts_(ok_puts) {}
  absl::Status Put(const std::string& id, const float* data, int64_t n,
                   engine::HomeTier tier) override {
    if (puts_++ >= ok_puts_) return absl::UnavailableError("memstore: connection reset");
    return MemoryTensorHome::Put(id, data, n, tier);
  }

 private:
  const int ok_puts_;
  std::atomic<int> puts_{0};
};

// An update whose writes fail returns the first error once nothing is in flight.
TEST(HostTrainingStateTest, AFailingHomeFailsTheUpdate) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  Buffers buf(c);
  int64_t chunks = 0;
  for (const TensorGroupShape& s : TensorGroupShapes(c)) chunks += (s.elems + 999) / 1000;
  // The weights and zero moments placed, then the update's writes: the second chunk's moments
  // fail.
  FailingHome home(3 * chunks + 4);
  StateHome mh{&home, "j/", engine::HomeTier::kNvme};
  mh.chunk_elems = 1000;
  auto state = HostTrainingState::Create(c, buf.Views(), mh, pool);
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_TRUE((*state)->InitRandom(1, pool).ok());
  const absl::Status s = (*state)->AdamW(0, nullptr, Hyper(), 1, 1.0f, pool);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("connection reset"));
}

TEST(HostTrainingStateTest, AHomeHoldsOneGenerationOfChunksOfSomeSize) {
  const engine::ModelConfig c = Config(true);
  engine::ThreadPool pool(1);
  Buffers buf(c);
  engine::MemoryTensorHome home;
  StateHome mh{&home, "j/", engine::HomeTier::kNvme};
  mh.chunk_elems = 0;
  EXPECT_EQ(HostTrainingState::Create(c, buf.Views(), mh, pool).status().code(),
            absl::StatusCode::kInvalidArgument);
  mh.chunk_elems = 5000;
  auto state = HostTrainingState::Create(c, buf.Views(), mh, pool);
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_TRUE((*state)->InitRandom(1, pool).ok());
  EXPECT_EQ((*state)->AdamW(0, nullptr, Hyper(), 1, 1.0f, pool, 0, 1).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE((*state)->AdamW(0, nullptr, Hyper(), 1, 1.0f, pool, 0, 0).ok());
}

TEST(HostTrainingStateTest, AnOwnerThatFreesTheHomeKeepsTheStateFromFreeingIt) {
  const engine::ModelConfig c = Config(true);
  engine::ThreadPool pool(1);
  Buffers buf(c);
  engine::MemoryTensorHome home;
  {
    StateHome mh{&home, "j/", engine::HomeTier::kHost};
    mh.freed_by_owner = true;
    auto state = HostTrainingState::Create(c, buf.Views(), mh, pool);
    ASSERT_TRUE(state.ok());
    ASSERT_TRUE((*state)->InitRandom(1, pool).ok());
  }
  int64_t chunks = 0;
  for (const TensorGroupShape& sh : TensorGroupShapes(c)) {
    chunks += (sh.elems + StateHome().chunk_elems - 1) / StateHome().chunk_elems;
  }
  EXPECT_EQ(home.num_tensors(), 3 * chunks);
}

// An update written beside the current values is kept by SetCurrent, or redone with a clipped
// gradient, or dropped with the bf16 copy rewritten: each as the engine's update from the same
// weights and moments, over two steps (generation 0 to 1, then 1 to 0).
// In this process, or with the state in a home (`home` not null) in chunks.
void ExpectSecondGenerationKeepsRedoesOrDropsAnUpdate(engine::MemoryTensorHome* home) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  Buffers buf(c);
  StateHome sh{home, "x/", engine::HomeTier::kNvme};
  sh.chunk_elems = 1000;
  auto state = HostTrainingState::Create(c, buf.Views(), sh, pool, /*two_generations=*/true);
  ASSERT_TRUE(state.ok()) << state.status();
  HostTrainingState& st = **state;
  engine::ModelParams p = RandomParams(c, 8, 0.02f);
  // Moments as after some training (v positive).
  engine::ModelParams m = RandomParams(c, 9, 0.01f), v = RandomParams(c, 10, 0.01f);
  for (auto& t : engine::NamedTensors(c, &v)) {
    for (float& x : *t.data) x = x * x;
  }
  ASSERT_TRUE(st.SetParams(p, pool).ok());
  ASSERT_TRUE(st.SetMoments(m, v).ok());
  const size_t groups = st.shapes().size(), embed = st.embed_group();
  auto set_grads = [&](const engine::ModelParams& g) {
    for (size_t k = 0; k < groups; ++k) {
      ASSERT_TRUE(CopyGroupTensors(c, const_cast<engine::ModelParams*>(&g), k,
                                   buf.grads[k].data(), true).ok());
    }
  };
  auto expect_state = [&](const std::string& what) {
    engine::ModelParams gp, gm, gv;
    ASSERT_TRUE(st.GetParams(&gp).ok());
    ASSERT_TRUE(st.GetMoments(&gm, &gv).ok());
    ExpectSame(c, gp, p, what + " weights");
    ExpectSame(c, gm, m, what + " m");
    ExpectSame(c, gv, v, what + " v");
    for (size_t k = 0; k < groups; ++k) {
      std::vector<float> flat(buf.grads[k].size(), 0.0f);
      ASSERT_TRUE(CopyGroupTensors(c, &p, k, flat.data(), true).ok());
      for (size_t i = 0; i < flat.size(); ++i) {
        ASSERT_EQ(buf.params[k][i], ToBf16Bits(flat[i])) << what << " group " << k << " " << i;
      }
    }
  };
  for (int64_t step = 1; step <= 2; ++step) {
    const int from = st.current(0), to = 1 - from;
    const engine::ModelParams g = RandomParams(c, 20 + step, 1.0f);
    set_grads(g);
    // Speculative, beside the current generation: the current weights and moments stay.
    for (size_t k = 0; k < groups; ++k) {
      if (k != embed) {
        ASSERT_TRUE(st.AdamW(k, nullptr, Hyper(), step, 1.0f, pool, from, to).ok());
      }
    }
    engine::ModelParams gp;
    ASSERT_TRUE(st.GetParams(&gp).ok());
    ExpectSame(c, gp, p, "speculated");
    if (home != nullptr) {  // written beside the current generation, in the home
      engine::HomeTier tier;
      EXPECT_TRUE(home->TierOf(to == 1 ? "x/master@1/0/0" : "x/master/0/0", &tier).ok());
    }
    if (step == 1) {
      // Dropped: the bf16 copies are the current weights' again.
      for (size_t k = 0; k < groups; ++k) ASSERT_TRUE(st.RewriteBf16(k, pool).ok());
      expect_state("dropped");
      // Redone with a clipped gradient (the gradients were left as they came) and kept.
      for (size_t k = 0; k < groups; ++k) {
        if (k == embed) {
          ASSERT_TRUE(st.AdamW(k, nullptr, Hyper(), step, 0.5f, pool).ok());
        } else {
          ASSERT_TRUE(st.AdamW(k, nullptr, Hyper(), step, 0.5f, pool, from, to).ok());
          st.SetCurrent(k, to);
        }
      }
      engine::ModelParams ge = g;
      EngineAdamW(c, &p, &ge, &m, &v, step, 0.5f);
      expect_state("redone and kept");
    } else {
      // Kept as speculated (no clipping needed).
      for (size_t k = 0; k < groups; ++k) {
        if (k == embed) {
          ASSERT_TRUE(st.AdamW(k, nullptr, Hyper(), step, 1.0f, pool).ok());
        } else {
          st.SetCurrent(k, to);
        }
      }
      engine::ModelParams ge = g;
      EngineAdamW(c, &p, &ge, &m, &v, step, 1.0f);
      expect_state("kept");
      EXPECT_EQ(st.current(0), 0);  // back to generation 0
    }
  }
  // The embedding has one generation.
  EXPECT_EQ(st.AdamW(embed, nullptr, Hyper(), 3, 1.0f, pool, 0, 1).code(),
            absl::StatusCode::kFailedPrecondition);
  int64_t elems = 0;
  for (const TensorGroupShape& g : st.shapes()) elems += g.elems;
  const int64_t second = 12 * (elems - st.shapes()[embed].elems);
  EXPECT_EQ(HostTrainingState::OwnBytes(c, false, true) - HostTrainingState::OwnBytes(c, false),
            second);
  EXPECT_EQ(HostTrainingState::HomeBytes(c, true) - HostTrainingState::HomeBytes(c), second);
  EXPECT_EQ(HostTrainingState::OwnBytes(c, true, true), HostTrainingState::OwnBytes(c, true));
}

TEST(HostTrainingStateTest, SecondGenerationKeepsRedoesOrDropsAnUpdate) {
  ExpectSecondGenerationKeepsRedoesOrDropsAnUpdate(nullptr);
}

TEST(HostTrainingStateTest, SecondGenerationInAHomeKeepsRedoesOrDropsAnUpdate) {
  engine::MemoryTensorHome home;
  ExpectSecondGenerationKeepsRedoesOrDropsAnUpdate(&home);
  // Both generations (not the embedding's second) were in the home; freed with the state.
  EXPECT_EQ(home.num_tensors(), 0);
  engine::HomeTier tier;
  EXPECT_GT(home.bytes_in(), 0);
  EXPECT_FALSE(home.TierOf("x/master@1/0/0", &tier).ok());
}

TEST(HostTrainingStateTest, EmbeddingRowsSplitCoverTheTableOnce) {
  const int64_t V = 50, h = 4;
  const std::vector<int32_t> ids = {7, 3, 4, 5, 7, 49, 0, 20, 21};
  std::vector<GroupSegment> rows, rest;
  HostTrainingState::SplitEmbeddingRows(ids, V, h, &rows, &rest);
  std::vector<int> covered(V * h, 0);
  for (const auto* segs : {&rows, &rest}) {
    for (const GroupSegment& s : *segs) {
      EXPECT_TRUE(s.matrix);
      for (int64_t i = s.offset; i < s.offset + s.size; ++i) covered[i]++;
    }
  }
  for (int64_t i = 0; i < V * h; ++i) ASSERT_EQ(covered[i], 1) << i;
  // Rows 0, 3-5, 7, 20-21 and 49 as runs.
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[1].offset, 3 * h);
  EXPECT_EQ(rows[1].size, 3 * h);
  int64_t row_elems = 0;
  for (const GroupSegment& s : rows) row_elems += s.size;
  EXPECT_EQ(row_elems, 8 * h);
}

TEST(HostTrainingStateTest, SplitUpdateEqualsTheWholeUpdate) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  Buffers a(c), b(c);
  auto sa = HostTrainingState::Create(c, a.Views(), {}, pool);
  auto sb = HostTrainingState::Create(c, b.Views(), {}, pool);
  ASSERT_TRUE(sa.ok() && sb.ok());
  const engine::ModelParams p = RandomParams(c, 3, 0.02f);
  ASSERT_TRUE((*sa)->SetParams(p, pool).ok());
  ASSERT_TRUE((*sb)->SetParams(p, pool).ok());
  const size_t e = (*sa)->embed_group();
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < a.grads[e].size(); ++i) a.grads[e][i] = b.grads[e][i] = normal(rng);
  // Every third row: more than 64 runs, which the update splits by segment.
  std::vector<int32_t> ids = {1, 2, 100, 255};
  for (int32_t r = 4; r < 255; r += 3) ids.push_back(r);
  std::vector<GroupSegment> rows, rest;
  HostTrainingState::SplitEmbeddingRows(ids, c.vocab_size, c.hidden_size, &rows, &rest);
  ASSERT_GT(rows.size(), 64u);
  ASSERT_GT(rest.size(), 64u);
  ASSERT_TRUE((*sa)->AdamW(e, &rows, Hyper(), 1, 0.5f, pool).ok());
  ASSERT_TRUE((*sa)->AdamW(e, &rest, Hyper(), 1, 0.5f, pool).ok());
  ASSERT_TRUE((*sb)->AdamW(e, nullptr, Hyper(), 1, 0.5f, pool).ok());
  engine::ModelParams pa, pb;
  ASSERT_TRUE((*sa)->GetParams(&pa).ok());
  ASSERT_TRUE((*sb)->GetParams(&pb).ok());
  ExpectSame(c, pa, pb, "split vs whole");
  EXPECT_EQ(a.params[e], b.params[e]);
}

// dx for `ids` tokens, bf16, and the engine-side reference: each token's row added in order.
std::vector<uint16_t> RandomDx(int64_t tokens, int64_t h, uint64_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> dx(tokens * h);
  for (uint16_t& x : dx) x = ToBf16Bits(normal(rng));
  return dx;
}

TEST(HostTrainingStateTest, EmbeddingGradientFromTheTokensInputGradients) {
  for (bool tied : {false, true}) {
    const engine::ModelConfig c = Config(tied);
    const int64_t h = c.hidden_size, V = c.vocab_size;
    engine::ThreadPool pool(3);
    Buffers buf(c);
    auto state = HostTrainingState::Create(c, buf.Views(), {}, pool);
    ASSERT_TRUE(state.ok());
    const size_t e = (*state)->embed_group();
    std::vector<float>& grad = buf.grads[e];
    std::vector<float> head(V * h);
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    for (float& x : head) x = normal(rng);
    for (int step = 0; step < 2; ++step) {
      const std::vector<int32_t> ids =
          step == 0 ? std::vector<int32_t>{5, 9, 5, 200} : std::vector<int32_t>{9, 17, 17};
      const std::vector<uint16_t> dx = RandomDx(ids.size(), h, 10 + step);
      // Tied, the head's gradient blocks arrive first and the tokens' gradients are added on.
      if (tied) grad = head;
      std::vector<float> want = tied ? head : std::vector<float>(V * h, 0.0f);
      for (size_t t = 0; t < ids.size(); ++t) {
        for (int64_t j = 0; j < h; ++j) want[ids[t] * h + j] += FromBf16Bits(dx[t * h + j]);
      }
      const double sumsq = (*state)->AddEmbeddingGradient(ids, dx.data(), pool);
      // Untied, the rows of the previous step are zero again.
      ASSERT_EQ(grad, want) << (tied ? "tied" : "untied") << " step " << step;
      double want_sumsq = 0;
      for (float x : want) want_sumsq += double{x} * x;
      EXPECT_NEAR(sumsq, want_sumsq, 1e-9 * want_sumsq);
    }
  }
}

TEST(HostTrainingStateTest, GathersEachTokensRowInTokenOrder) {
  const engine::ModelConfig c = Config(true);
  engine::ThreadPool pool(2);
  Buffers buf(c);
  auto state = HostTrainingState::Create(c, buf.Views(), {}, pool);
  ASSERT_TRUE(state.ok());
  ASSERT_TRUE((*state)->SetParams(RandomParams(c, 6, 0.02f), pool).ok());
  const std::vector<int32_t> ids = {3, 3, 255, 0};
  const int64_t h = c.hidden_size;
  std::vector<uint16_t> out(ids.size() * h), out1(ids.size() * h);
  (*state)->GatherEmbeddingRows(ids, out.data(), &pool);
  (*state)->GatherEmbeddingRows(ids, out1.data(), nullptr);
  EXPECT_EQ(out, out1);
  const std::vector<uint16_t>& table = buf.params[(*state)->embed_group()];
  for (size_t t = 0; t < ids.size(); ++t) {
    for (int64_t j = 0; j < h; ++j) ASSERT_EQ(out[t * h + j], table[ids[t] * h + j]);
  }
}

TEST(HostTrainingStateTest, InitRandomIsSeededNormalMatricesAndUnitNorms) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  Buffers a(c), b(c);
  auto sa = HostTrainingState::Create(c, a.Views(), {}, pool);
  auto sb = HostTrainingState::Create(c, b.Views(), {}, pool);
  ASSERT_TRUE(sa.ok() && sb.ok());
  ASSERT_TRUE((*sa)->InitRandom(7, pool).ok());
  ASSERT_TRUE((*sb)->InitRandom(7, pool).ok());
  EXPECT_EQ(a.params, b.params);
  engine::ModelParams p;
  ASSERT_TRUE((*sa)->GetParams(&p).ok());
  EXPECT_EQ(p.norm, std::vector<float>(c.hidden_size, 1.0f));
  double sum = 0, sumsq = 0;
  for (float x : p.embed_tokens) {
    sum += x;
    sumsq += double{x} * x;
  }
  const double n = static_cast<double>(p.embed_tokens.size());
  EXPECT_NEAR(sum / n, 0.0, 0.002);
  EXPECT_NEAR(std::sqrt(sumsq / n), c.init_std, 0.05 * c.init_std);
}

// Weights read from a checkpoint a group at a time land as SetParams(ModelParams) puts them:
// the same master weights, bf16 copies and zero moments.
TEST(HostTrainingStateTest, SetParamsFromACheckpointEqualsSetParams) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(2);
  const engine::ModelParams p = RandomParams(c, 5, 0.02f);
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") + "/set_params_ckpt";
  ASSERT_TRUE(engine::ExportHfDirectory(dir, c, p, /*max_shard_bytes=*/20000).ok());  // shards
  auto reader = engine::WeightsReader::Open(dir, c);
  ASSERT_TRUE(reader.ok()) << reader.status();
  Buffers a(c), b(c);
  auto sa = HostTrainingState::Create(c, a.Views(), {}, pool);
  auto sb = HostTrainingState::Create(c, b.Views(), {}, pool);
  ASSERT_TRUE(sa.ok() && sb.ok());
  ASSERT_TRUE((*sa)->SetParams(p, pool).ok());
  ASSERT_TRUE((*sb)->SetParams(**reader, pool).ok());
  engine::ModelParams ga, gb, ma, va;
  ASSERT_TRUE((*sa)->GetParams(&ga).ok());
  ASSERT_TRUE((*sb)->GetParams(&gb).ok());
  ExpectSame(c, gb, ga, "master");
  EXPECT_EQ(a.params, b.params);  // bf16 copies
  ASSERT_TRUE((*sb)->GetMoments(&ma, &va).ok());
  for (const engine::NamedTensor<float>& t : engine::NamedTensors(c, &ma)) {
    for (float x : *t.data) ASSERT_EQ(x, 0.0f) << t.name;
  }
}

// Random initial weights made a tensor group at a time (engine::RandomWeights, the groups in
// NamedTensors order: the embedding's first, though it is not group 0) are InitParams' values.
TEST(HostTrainingStateTest, SetParamsFromRandomWeightsEqualsInitParams) {
  for (bool tied : {false, true}) {
    const engine::ModelConfig c = Config(tied);
    engine::ThreadPool pool(2);
    engine::ModelParams p;
    engine::InitParams(c, 13, &p, &pool);
    engine::RandomWeights random(c, 13, &pool);
    Buffers a(c), b(c);
    auto sa = HostTrainingState::Create(c, a.Views(), {}, pool);
    auto sb = HostTrainingState::Create(c, b.Views(), {}, pool);
    ASSERT_TRUE(sa.ok() && sb.ok());
    ASSERT_TRUE((*sa)->SetParams(p, pool).ok());
    const absl::Status s = (*sb)->SetParams(random, pool);
    ASSERT_TRUE(s.ok()) << s;
    engine::ModelParams ga, gb;
    ASSERT_TRUE((*sa)->GetParams(&ga).ok());
    ASSERT_TRUE((*sb)->GetParams(&gb).ok());
    ExpectSame(c, gb, ga, tied ? "tied master" : "master");
    EXPECT_EQ(a.params, b.params);  // bf16 copies
  }
}

TEST(HostTrainingStateTest, RefusesParamsOfAnotherShape) {
  const engine::ModelConfig c = Config(false);
  engine::ThreadPool pool(1);
  Buffers buf(c);
  auto state = HostTrainingState::Create(c, buf.Views(), {}, pool);
  ASSERT_TRUE(state.ok());
  engine::ModelParams p = engine::AllocateParams<float>(c);
  p.norm.resize(3);
  const absl::Status s = (*state)->SetParams(p, pool);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("3 values where 64 belong"));
  auto few = HostTrainingState::Create(c, {}, {}, pool);
  EXPECT_EQ(few.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HostJobQueueTest, RunsInOrderFrontFirstAndSkipsJobsWhoseInputNeverCame) {
  std::atomic<bool> started{false};
  std::vector<int> order;
  std::promise<void> release;
  std::shared_future<void> gate = release.get_future().share();
  {
    HostJobQueue q(2, [&] { started = true; });
    // The first job holds the queue until released, so the others are all queued behind it.
    std::promise<void> running;
    q.Submit(nullptr, [&](engine::ThreadPool&) {
      running.set_value();
      gate.wait();
      order.push_back(0);
      return absl::OkStatus();
    });
    running.get_future().wait();
    auto push = [&](int i) {
      return [&order, i](engine::ThreadPool&) {
        order.push_back(i);
        return absl::OkStatus();
      };
    };
    q.Submit(nullptr, push(1));
    q.Submit([] { return absl::InternalError("event failed"); }, push(99));
    q.Submit(nullptr, push(2));
    auto front = q.Submit(nullptr, push(3), /*front=*/true);
    auto failing = q.Submit(nullptr, [](engine::ThreadPool&) {
      return absl::NotFoundError("no such tensor");
    });
    release.set_value();
    front.wait();
    failing.wait();
    const absl::Status e = q.error();
    EXPECT_EQ(e.code(), absl::StatusCode::kInternal);
    EXPECT_THAT(std::string(e.message()), HasSubstr("event failed"));
    EXPECT_THAT(std::string(e.message()), HasSubstr("did not run"));
  }
  EXPECT_TRUE(started);
  EXPECT_EQ(order, (std::vector<int>{0, 3, 1, 2}));
}

}  // namespace
}  // namespace lumen::cuda
