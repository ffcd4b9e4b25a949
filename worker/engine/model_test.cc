// Gradient checks of every kernel's backward and of the whole model against central finite
// differences in double precision, and checkpointing on/off bit-identity in float.
#include "worker/engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine/kernels.h"

namespace lumen::engine {
namespace {

using ::testing::HasSubstr;

std::vector<double> RandomVec(int64_t n, std::mt19937_64* rng, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) {
    do {
      x = dist(*rng);
    } while (std::abs(x) < 1e-3);  // never zero
  }
  return v;
}

// Compares `analytic` with central differences of `loss` w.r.t. every element of `param`.
void CheckGrad(const char* what, std::vector<double>* param, const std::vector<double>& analytic,
               const std::function<double()>& loss, double h = 1e-5, double rtol = 1e-6) {
  ASSERT_EQ(param->size(), analytic.size()) << what;
  double max_grad = 0;
  for (double g : analytic) max_grad = std::max(max_grad, std::abs(g));
  ASSERT_GT(max_grad, 0) << what;
  for (size_t i = 0; i < param->size(); ++i) {
    const double saved = (*param)[i];
    (*param)[i] = saved + h;
    const double lp = loss();
    (*param)[i] = saved - h;
    const double lm = loss();
    (*param)[i] = saved;
    const double numeric = (lp - lm) / (2 * h);
    EXPECT_NEAR(analytic[i], numeric, rtol * std::max(std::abs(numeric), 1e-2 * max_grad))
        << what << " element " << i;
  }
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

class KernelGradTest : public ::testing::Test {
 protected:
  std::mt19937_64 rng_{42};
  ThreadPool pool_{2};
};

TEST_F(KernelGradTest, Linear) {
  const int64_t n = 5, in = 4, out = 3;
  auto x = RandomVec(n * in, &rng_), w = RandomVec(out * in, &rng_), r = RandomVec(n * out, &rng_);
  std::vector<double> y(n * out);
  auto loss = [&] {
    kernels::LinearForward(x.data(), w.data(), n, in, out, y.data());
    return Dot(y, r);
  };
  std::vector<double> dx(n * in, 7.0), dw(out * in, 0.0);
  kernels::LinearBackward(r.data(), x.data(), w.data(), n, in, out, dx.data(), false, dw.data());
  CheckGrad("linear dx", &x, dx, loss);
  CheckGrad("linear dw", &w, dw, loss);
}

TEST_F(KernelGradTest, Embedding) {
  const int64_t v = 7, c = 4, n = 9;
  std::vector<int32_t> ids = {3, 1, 3, 0, 6, 6, 2, 3, 5};
  auto table = RandomVec(v * c, &rng_), r = RandomVec(n * c, &rng_);
  std::vector<double> out(n * c);
  auto loss = [&] {
    kernels::EmbeddingForward(table.data(), ids.data(), n, c, out.data(), &pool_);
    return Dot(out, r);
  };
  std::vector<double> dt(v * c, 0.0);
  kernels::EmbeddingBackward(r.data(), ids.data(), n, c, dt.data(), &pool_);
  // Row 4 is never used: its gradient must be exactly 0.
  for (int j = 0; j < c; ++j) EXPECT_EQ(dt[4 * c + j], 0.0);
  CheckGrad("embedding", &table, dt, loss);
}

TEST_F(KernelGradTest, RmsNorm) {
  const int64_t n = 6, c = 8;
  auto x = RandomVec(n * c, &rng_), w = RandomVec(c, &rng_), r = RandomVec(n * c, &rng_);
  std::vector<double> y(n * c), rstd(n);
  auto loss = [&] {
    kernels::RmsNormForward(x.data(), w.data(), n, c, 1e-5, y.data(), rstd.data(), &pool_);
    return Dot(y, r);
  };
  loss();
  std::vector<double> dx(n * c, 0.5), dw(c, 0.0);
  kernels::RmsNormBackward(r.data(), x.data(), w.data(), rstd.data(), n, c, dx.data(), false,
                           dw.data(), &pool_);
  CheckGrad("rmsnorm dx", &x, dx, loss);
  CheckGrad("rmsnorm dw", &w, dw, loss);
  // Accumulate mode adds.
  std::vector<double> dx2(n * c, 0.5), dw2(c, 1.0);
  kernels::RmsNormBackward(r.data(), x.data(), w.data(), rstd.data(), n, c, dx2.data(), true,
                           dw2.data(), &pool_);
  for (int64_t i = 0; i < n * c; ++i) EXPECT_NEAR(dx2[i], dx[i] + 0.5, 1e-12);
  for (int64_t i = 0; i < c; ++i) EXPECT_NEAR(dw2[i], dw[i] + 1.0, 1e-12);
}

TEST_F(KernelGradTest, Rope) {
  const int64_t batch = 2, seq = 3, heads = 2, d = 6, pos0 = 5;
  const int64_t n = batch * seq;
  std::vector<double> cs((pos0 + seq) * d / 2), sn((pos0 + seq) * d / 2);
  kernels::RopeTables<double>(pos0 + seq, d, 10000.0, cs.data(), sn.data());
  auto x = RandomVec(n * heads * d, &rng_), r = RandomVec(n * heads * d, &rng_);
  auto loss = [&] {
    std::vector<double> y = x;
    kernels::Rope(y.data(), n, seq, heads, d, pos0, cs.data(), sn.data(), false, &pool_);
    return Dot(y, r);
  };
  std::vector<double> dx = r;
  kernels::Rope(dx.data(), n, seq, heads, d, pos0, cs.data(), sn.data(), true, &pool_);
  CheckGrad("rope", &x, dx, loss);
  // Hand value: position 1 (row 1), head 0, pair (0, 3) rotates by angle 1 * inv_freq_0 = 1.
  std::vector<double> y = x;
  kernels::Rope(y.data(), n, seq, heads, d, 0, cs.data(), sn.data(), false, nullptr);
  const double* xr = x.data() + 1 * heads * d;
  EXPECT_NEAR(y[heads * d + 0], xr[0] * std::cos(1.0) - xr[3] * std::sin(1.0), 1e-14);
  EXPECT_NEAR(y[heads * d + 3], xr[3] * std::cos(1.0) + xr[0] * std::sin(1.0), 1e-14);
}

TEST_F(KernelGradTest, Attention) {
  const int64_t batch = 2, seq = 4, heads = 4, kv = 2, d = 3;
  const int64_t n = batch * seq;
  auto q = RandomVec(n * heads * d, &rng_), k = RandomVec(n * kv * d, &rng_),
       v = RandomVec(n * kv * d, &rng_), r = RandomVec(n * heads * d, &rng_);
  std::vector<double> probs(batch * heads * seq * seq), out(n * heads * d);
  auto loss = [&] {
    kernels::AttentionForward(q.data(), k.data(), v.data(), batch, seq, heads, kv, d,
                              probs.data(), out.data(), &pool_);
    return Dot(out, r);
  };
  loss();
  std::vector<double> dprobs(probs.size()), dq(q.size(), 3.0), dk(k.size(), 3.0),
      dv(v.size(), 3.0);
  kernels::AttentionBackward(r.data(), q.data(), k.data(), v.data(), probs.data(), batch, seq,
                             heads, kv, d, dprobs.data(), dq.data(), dk.data(), dv.data(),
                             &pool_);
  CheckGrad("attention dq", &q, dq, loss);
  CheckGrad("attention dk", &k, dk, loss);
  CheckGrad("attention dv", &v, dv, loss);
  // Causality: the first query attends only to the first key.
  EXPECT_EQ(probs[0], 1.0);
  EXPECT_EQ(probs[1], 0.0);
}

TEST_F(KernelGradTest, SwiGlu) {
  const int64_t n = 20;
  auto g = RandomVec(n, &rng_, 2.0), u = RandomVec(n, &rng_), r = RandomVec(n, &rng_);
  std::vector<double> m(n);
  auto loss = [&] {
    kernels::SwiGluForward(g.data(), u.data(), n, m.data(), &pool_);
    return Dot(m, r);
  };
  std::vector<double> dg(n), du(n);
  kernels::SwiGluBackward(r.data(), g.data(), u.data(), n, dg.data(), du.data(), &pool_);
  CheckGrad("swiglu dg", &g, dg, loss);
  CheckGrad("swiglu du", &u, du, loss);
  loss();
  EXPECT_NEAR(m[0], g[0] / (1 + std::exp(-g[0])) * u[0], 1e-15);
}

TEST_F(KernelGradTest, CrossEntropy) {
  const int64_t n = 5, v = 7;
  std::vector<int32_t> targets = {0, 6, 3, 3, 1};
  auto logits = RandomVec(n * v, &rng_, 2.0);
  std::vector<double> losses(n);
  auto loss = [&] {
    std::vector<double> l = logits;
    kernels::CrossEntropy(l.data(), targets.data(), n, v, 0.0, losses.data(), &pool_);
    double s = 0;
    for (double x : losses) s += x;
    return s / n;
  };
  std::vector<double> grad = logits;
  kernels::CrossEntropy(grad.data(), targets.data(), n, v, 1.0 / n, losses.data(), &pool_);
  CheckGrad("cross-entropy", &logits, grad, loss);
  // Hand value for row 0.
  double lse = 0;
  for (int j = 0; j < v; ++j) lse += std::exp(logits[j]);
  loss();
  EXPECT_NEAR(losses[0], std::log(lse) - logits[0], 1e-12);
}

// The lane-parallel float kernel against a plain one-accumulator reference, at a vocabulary
// that exercises both the 8-lane body and the tail.
TEST(CrossEntropyKernelTest, MatchesPlainReferenceOnRandomFloatRows) {
  const int64_t n = 6, v = 1003;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(n * v);
  for (float& x : logits) x = dist(rng);
  std::vector<int32_t> targets = {0, 1002, 17, 500, 999, 8};
  ThreadPool pool(2);
  std::vector<float> grad = logits;
  std::vector<double> losses(n), losses2(n);
  kernels::CrossEntropy(grad.data(), targets.data(), n, v, 0.5f, losses.data(), &pool);
  std::vector<float> copy = logits;
  kernels::CrossEntropy(copy.data(), targets.data(), n, v, 0.0f, losses2.data(), nullptr);
  EXPECT_EQ(copy, logits);  // loss-only leaves the logits alone
  for (int64_t r = 0; r < n; ++r) {
    const float* row = logits.data() + r * v;
    float mx = row[0];
    for (int64_t j = 1; j < v; ++j) mx = std::max(mx, row[j]);
    double sum = 0;
    for (int64_t j = 0; j < v; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
    const double want = mx + std::log(sum) - row[targets[r]];
    EXPECT_NEAR(losses[r], want, 1e-5 * std::abs(want)) << r;
    EXPECT_EQ(losses[r], losses2[r]) << r;
    for (int64_t j = 0; j < v; ++j) {
      const double p = std::exp(static_cast<double>(row[j]) - mx) / sum;
      const double g = 0.5 * (p - (j == targets[r] ? 1.0 : 0.0));
      ASSERT_NEAR(grad[r * v + j], g, 1e-6) << r << "," << j;
    }
  }
}

// Plain causal attention in double: full T x T scores per (batch, head), no tiling.
void ReferenceAttention(const std::vector<double>& q, const std::vector<double>& k,
                        const std::vector<double>& v, const std::vector<double>& dout,
                        int64_t batch, int64_t seq, int64_t heads, int64_t kv, int64_t d,
                        std::vector<double>* out, std::vector<double>* dq,
                        std::vector<double>* dk, std::vector<double>* dv) {
  const int64_t group = heads / kv, qs = heads * d, ks = kv * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  out->assign(q.size(), 0.0);
  dq->assign(q.size(), 0.0);
  dk->assign(k.size(), 0.0);
  dv->assign(v.size(), 0.0);
  std::vector<double> p(seq), dp(seq);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < seq; ++i) {
        const double* qi = &q[(b * seq + i) * qs + h * d];
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t e = 0; e < d; ++e) s += qi[e] * k[(b * seq + j) * ks + g * d + e];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        const double* doi = &dout[(b * seq + i) * qs + h * d];
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          p[j] /= sum;
          dp[j] = 0;
          for (int64_t e = 0; e < d; ++e) {
            (*out)[(b * seq + i) * qs + h * d + e] += p[j] * v[(b * seq + j) * ks + g * d + e];
            dp[j] += doi[e] * v[(b * seq + j) * ks + g * d + e];
            (*dv)[(b * seq + j) * ks + g * d + e] += p[j] * doi[e];
          }
          dot += p[j] * dp[j];
        }
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - dot) * scale;
          for (int64_t e = 0; e < d; ++e) {
            (*dq)[(b * seq + i) * qs + h * d + e] += ds * k[(b * seq + j) * ks + g * d + e];
            (*dk)[(b * seq + j) * ks + g * d + e] += ds * qi[e];
          }
        }
      }
    }
  }
}

// The tiled kernels against the plain reference at a length of several query tiles plus a
// partial one, with grouped-query heads; and bit-identical with and without the pool.
TEST(AttentionKernelTest, TiledMatchesFullReference) {
  const int64_t batch = 2, seq = 2 * kernels::kAttentionTile + 23, heads = 4, kv = 2, d = 8;
  const int64_t n = batch * seq;
  std::mt19937_64 rng(21);
  auto q = RandomVec(n * heads * d, &rng), k = RandomVec(n * kv * d, &rng),
       v = RandomVec(n * kv * d, &rng), dout = RandomVec(n * heads * d, &rng);
  std::vector<double> want_out, want_dq, want_dk, want_dv;
  ReferenceAttention(q, k, v, dout, batch, seq, heads, kv, d, &want_out, &want_dq, &want_dk,
                     &want_dv);
  ThreadPool pool(2);
  std::vector<double> outs[2], dqs[2], dks[2], dvs[2];
  for (int run = 0; run < 2; ++run) {
    ThreadPool* p = run == 0 ? &pool : nullptr;
    std::vector<double> probs(batch * heads * seq * seq), dprobs(probs.size());
    outs[run].assign(q.size(), 7.0);
    dqs[run].assign(q.size(), 7.0);
    dks[run].assign(k.size(), 7.0);
    dvs[run].assign(v.size(), 7.0);
    kernels::AttentionForward(q.data(), k.data(), v.data(), batch, seq, heads, kv, d,
                              probs.data(), outs[run].data(), p);
    kernels::AttentionBackward(dout.data(), q.data(), k.data(), v.data(), probs.data(), batch,
                               seq, heads, kv, d, dprobs.data(), dqs[run].data(),
                               dks[run].data(), dvs[run].data(), p);
  }
  auto expect_near = [](const char* what, const std::vector<double>& got,
                        const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-10 * std::max(1.0, std::abs(want[i]))) << what << " " << i;
    }
  };
  expect_near("out", outs[0], want_out);
  expect_near("dq", dqs[0], want_dq);
  expect_near("dk", dks[0], want_dk);
  expect_near("dv", dvs[0], want_dv);
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(dqs[0], dqs[1]);
  EXPECT_EQ(dks[0], dks[1]);
  EXPECT_EQ(dvs[0], dvs[1]);
}

// Every transpose combination, split by rows (tall C) and by columns (short C), accumulating
// into C, against a plain triple loop; and the same bits on every call.
TEST(ParallelGemmTest, MatchesPlainProductForAllLayouts) {
  std::mt19937_64 rng(5);
  ThreadPool pool(2);
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{203, 67, 45}, {7, 301, 150},
                         {64, 64, 64}}) {
    for (int layout = 0; layout < 4; ++layout) {
      const bool ta = layout & 1, tb = layout & 2;
      std::vector<float> a(m * k), b(k * n), c0(m * n);
      std::normal_distribution<float> dist;
      for (float& x : a) x = dist(rng);
      for (float& x : b) x = dist(rng);
      for (float& x : c0) x = dist(rng);
      const int64_t lda = ta ? m : k, ldb = tb ? k : n;
      std::vector<float> c = c0, again = c0;
      kernels::ParallelGemm(&pool, ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f,
                            c.data(), n);
      kernels::ParallelGemm(&pool, ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f,
                            again.data(), n);
      EXPECT_EQ(c, again);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t e = 0; e < k; ++e) {
            s += static_cast<double>(ta ? a[e * lda + i] : a[i * lda + e]) *
                 (tb ? b[j * ldb + e] : b[e * ldb + j]);
          }
          const double want = 0.5 * s + 2.0 * c0[i * n + j];
          ASSERT_NEAR(c[i * n + j], want, 1e-4 * (1 + std::abs(want)))
              << m << "x" << n << "x" << k << " layout " << layout << " at " << i << "," << j;
        }
      }
    }
  }
}

TEST(SimdExpTest, MatchesStdExpAndHandlesSpecialValues) {
  std::vector<float> xs;
  for (float x = -87.0f; x < 88.0f; x += 0.0137f) xs.push_back(x);
  const size_t body = xs.size();
  for (float x : {0.0f, -0.0f, -87.5f, -1e30f, 88.5f, 1e30f, -INFINITY, INFINITY, NAN}) {
    xs.push_back(x);
  }
  std::vector<float> ys(xs.size());
  kernels::simd::Map(xs.data(), static_cast<int64_t>(xs.size()), 0.0f, ys.data(),
                     [](kernels::simd::F4 v) { return kernels::simd::Exp(v); });
  for (size_t i = 0; i < body; ++i) {
    const double want = std::exp(static_cast<double>(xs[i]));
    ASSERT_NEAR(ys[i], want, 2e-7 * want) << xs[i];
  }
  const float* s = ys.data() + body;
  EXPECT_EQ(s[0], 1.0f);
  EXPECT_EQ(s[1], 1.0f);
  EXPECT_EQ(s[2], 0.0f);
  EXPECT_EQ(s[3], 0.0f);
  EXPECT_EQ(s[4], INFINITY);
  EXPECT_EQ(s[5], INFINITY);
  EXPECT_EQ(s[6], 0.0f);
  EXPECT_EQ(s[7], INFINITY);
  EXPECT_TRUE(std::isnan(s[8]));
}

// The vectorised float SwiGLU against the double formulas, at a length with a partial vector.
TEST(SwiGluKernelTest, FloatMatchesDoubleReference) {
  const int64_t n = 1003;
  std::mt19937_64 rng(8);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  std::vector<float> g(n), u(n), dm(n), m(n), dg(n), du(n);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = dist(rng);
    u[i] = dist(rng);
    dm[i] = dist(rng);
  }
  ThreadPool pool(2);
  kernels::SwiGluForward(g.data(), u.data(), n, m.data(), &pool);
  kernels::SwiGluBackward(dm.data(), g.data(), u.data(), n, dg.data(), du.data(), &pool);
  for (int64_t i = 0; i < n; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
    const double want_m = g[i] * s * u[i];
    const double want_du = dm[i] * g[i] * s;
    const double want_dg = dm[i] * u[i] * s * (1 + g[i] * (1 - s));
    ASSERT_NEAR(m[i], want_m, 1e-6 * (1 + std::abs(want_m))) << i;
    ASSERT_NEAR(du[i], want_du, 1e-6 * (1 + std::abs(want_du))) << i;
    ASSERT_NEAR(dg[i], want_dg, 1e-6 * (1 + std::abs(want_dg))) << i;
  }
}

ModelConfig TinyConfig(bool tied) {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.vocab_size = 11;
  c.max_position_embeddings = 16;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  return c;
}

template <typename T>
void RandomInit(const ModelConfig& c, ModelParamsT<T>* p, uint64_t seed, double std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (NamedTensor<T>& t : NamedTensors(c, p)) {
    const bool is_norm = t.shape.size() == 1;
    for (T& x : *t.data) x = static_cast<T>(is_norm ? 1.0 + 0.2 * dist(rng) : std * dist(rng));
  }
}

class ModelGradTest : public ::testing::TestWithParam<bool> {};

TEST_P(ModelGradTest, WholeModelMatchesFiniteDifferences) {
  const ModelConfig c = TinyConfig(GetParam());
  ThreadPool pool(2);
  LlamaModelT<double> model(c, /*activation_checkpointing=*/false, &pool);
  RandomInit(c, &model.params(), 7, 0.5);
  const int64_t batch = 2, seq = 5;
  std::vector<int32_t> inputs = {1, 4, 9, 10, 0, 3, 3, 7, 2, 8};
  std::vector<int32_t> targets = {4, 9, 10, 0, 5, 3, 7, 2, 8, 1};
  model.ZeroGrads();
  ASSERT_TRUE(model.ForwardBackward(inputs.data(), targets.data(), batch, seq, 1.0).ok());
  auto loss = [&] { return model.Forward(inputs.data(), targets.data(), batch, seq).value(); };
  auto params = NamedTensors(c, &model.params());
  auto grads = NamedTensors(c, &model.grads());
  for (size_t i = 0; i < params.size(); ++i) {
    CheckGrad(params[i].name.c_str(), params[i].data, *grads[i].data, loss);
  }
}

INSTANTIATE_TEST_SUITE_P(TiedAndUntied, ModelGradTest, ::testing::Values(false, true));

TEST(ModelTest, CheckpointingIsBitIdentical) {
  ModelConfig c = TinyConfig(false);
  c.hidden_size = 32;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.vocab_size = 50;
  ThreadPool pool(2);
  LlamaModel plain(c, false, &pool), ckpt(c, true, &pool);
  RandomInit(c, &plain.params(), 3, 0.1);
  ckpt.params() = plain.params();
  std::mt19937_64 rng(5);
  const int64_t batch = 3, seq = 7;
  plain.ZeroGrads();
  ckpt.ZeroGrads();
  for (int micro = 0; micro < 2; ++micro) {
    std::vector<int32_t> in(batch * seq), tg(batch * seq);
    for (auto& x : in) x = static_cast<int32_t>(rng() % c.vocab_size);
    for (auto& x : tg) x = static_cast<int32_t>(rng() % c.vocab_size);
    const double a = plain.ForwardBackward(in.data(), tg.data(), batch, seq, 0.5f).value();
    const double b = ckpt.ForwardBackward(in.data(), tg.data(), batch, seq, 0.5f).value();
    EXPECT_EQ(a, b);
  }
  auto ga = NamedTensors(c, &plain.grads());
  auto gb = NamedTensors(c, &ckpt.grads());
  for (size_t i = 0; i < ga.size(); ++i) {
    ASSERT_EQ(ga[i].data->size(), gb[i].data->size());
    EXPECT_EQ(0, std::memcmp(ga[i].data->data(), gb[i].data->data(),
                             sizeof(float) * ga[i].data->size()))
        << ga[i].name;
    double norm = 0;
    for (float g : *ga[i].data) norm += g * g;
    EXPECT_GT(norm, 0) << ga[i].name;
  }
}

TEST(ModelTest, RejectsOutOfRangeIds) {
  const ModelConfig c = TinyConfig(true);
  LlamaModel model(c, false, nullptr);
  std::vector<int32_t> in = {1, 2, 11}, tg = {1, 2, 3};
  auto r = model.Forward(in.data(), tg.data(), 1, 3);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("inputs[2] = 11"));
}

TEST(ModelTest, ParameterCountMatchesTensors) {
  for (bool tied : {false, true}) {
    ModelConfig c = TinyConfig(tied);
    ModelParams p = AllocateParams<float>(c);
    int64_t total = 0;
    for (auto& t : NamedTensors(c, &p)) total += static_cast<int64_t>(t.data->size());
    EXPECT_EQ(total, ParameterCount(c));
  }
  ModelConfig c = TinyConfig(false);
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.vocab_size = 128256;
  EXPECT_EQ(ParameterCount(c), 8030261248);  // Llama-3 8B
}

TEST(ModelTest, ConfigChecks) {
  ModelConfig c = TinyConfig(false);
  EXPECT_TRUE(CheckModelConfig(c).ok());
  c.num_key_value_heads = 3;
  EXPECT_THAT(std::string(CheckModelConfig(c).message()), HasSubstr("num_key_value_heads 3"));
}

}  // namespace
}  // namespace lumen::engine
