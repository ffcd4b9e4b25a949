// Each CUDA kernel against the CPU engine's reference (worker/engine/kernels.h, optimizer.h)
// on random inputs: bf16 outputs within 1e-2 normwise relative error, fp32 outputs within
// 1e-5. Inputs are rounded to bf16 on the host so both sides see the same values.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/cuda/attention.h"
#include "worker/cuda/device.h"
#include "worker/cuda/gemm.h"
#include "worker/cuda/kernels.h"
#include "worker/cuda/measure.h"
#include "worker/engine/kernels.h"
#include "worker/engine/optimizer.h"

namespace lumen::cuda {
namespace {

using gpu_test::FromBf16;
using gpu_test::NormwiseError;
using gpu_test::RandomBf16Values;
using gpu_test::ToBf16;

constexpr double kBf16Tol = 1e-2;
constexpr double kF32Tol = 1e-5;

class KernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dev = CudaDevice::Create(CudaDeviceOptions{});
    ASSERT_TRUE(dev.ok()) << dev.status();
    dev_ = std::move(dev).value();
    st_ = dev_->compute_stream();
  }

  // Uploads go on the kernels' stream (not ordered with the legacy default stream a plain
  // cudaMemcpy uses); from pageable memory they return once the bytes are staged.
  DeviceBuffer Bf16(const std::vector<float>& v) {
    auto b = dev_->Allocate(2 * v.size() + 2, "test");
    EXPECT_TRUE(b.ok()) << b.status();
    const std::vector<uint16_t> h = ToBf16(v);
    EXPECT_EQ(cudaMemcpyAsync(b->get(), h.data(), 2 * h.size(), cudaMemcpyHostToDevice, st_),
              cudaSuccess);
    return std::move(b).value();
  }
  DeviceBuffer F32(const std::vector<float>& v) {
    auto b = dev_->Allocate(4 * v.size() + 4, "test");
    EXPECT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(cudaMemcpyAsync(b->get(), v.data(), 4 * v.size(), cudaMemcpyHostToDevice, st_),
              cudaSuccess);
    return std::move(b).value();
  }
  template <typename T>
  DeviceBuffer Raw(const std::vector<T>& v) {
    auto b = dev_->Allocate(sizeof(T) * v.size() + 4, "test");
    EXPECT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(
        cudaMemcpyAsync(b->get(), v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice, st_),
        cudaSuccess);
    return std::move(b).value();
  }
  std::vector<float> GetBf16(const DeviceBuffer& b, int64_t n) {
    EXPECT_EQ(cudaStreamSynchronize(st_), cudaSuccess);
    std::vector<uint16_t> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), b.get(), 2 * n, cudaMemcpyDeviceToHost), cudaSuccess);
    return FromBf16(h);
  }
  std::vector<float> GetF32(const DeviceBuffer& b, int64_t n) {
    EXPECT_EQ(cudaStreamSynchronize(st_), cudaSuccess);
    std::vector<float> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), b.get(), 4 * n, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }

  std::unique_ptr<CudaDevice> dev_;
  cudaStream_t st_ = nullptr;
};

// Reference product in double: D = op(A) op(B) + beta * C, row-major.
std::vector<float> RefGemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                           const std::vector<float>& a, const std::vector<float>& b, float beta,
                           const std::vector<float>& c) {
  std::vector<float> d(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = beta != 0 ? beta * static_cast<double>(c[i * n + j]) : 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p];
        const double bv = tb ? b[j * k + p] : b[p * n + j];
        acc += av * bv;
      }
      d[i * n + j] = static_cast<float>(acc);
    }
  }
  return d;
}

class GemmTest : public KernelsTest, public ::testing::WithParamInterface<GemmBackend> {};

TEST_P(GemmTest, AllTransposesAndOutputTypesMatchReference) {
  dev_->gemm().set_backend(GetParam());
  const int64_t m = 96, n = 80, k = 136;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const auto a = RandomBf16Values(m * k, 1.0f, 1);
      const auto b = RandomBf16Values(k * n, 1.0f, 2);
      const auto c = RandomBf16Values(m * n, 1.0f, 3);
      DeviceBuffer da = Bf16(a), db = Bf16(b);
      const int64_t lda = ta ? m : k, ldb = tb ? k : n;
      // bf16 out, C != D, beta = 1.
      DeviceBuffer dc = Bf16(c), dd = Bf16(std::vector<float>(m * n, 0.0f));
      ASSERT_TRUE(dev_->gemm()
                      .Run(ta, tb, m, n, k, da.as<bf16>(), lda, db.as<bf16>(), ldb, 1.0f,
                           dc.get(), dd.get(), n, GemmOut::kBf16, st_, "test")
                      .ok());
      EXPECT_LE(NormwiseError(GetBf16(dd, m * n), RefGemm(ta, tb, m, n, k, a, b, 1.0f, c)),
                kBf16Tol)
          << "bf16 ta=" << ta << " tb=" << tb;
      // fp32 out accumulating in place (the weight-gradient case).
      DeviceBuffer df = F32(c);
      ASSERT_TRUE(dev_->gemm()
                      .Run(ta, tb, m, n, k, da.as<bf16>(), lda, db.as<bf16>(), ldb, 1.0f,
                           df.get(), df.get(), n, GemmOut::kF32, st_, "test")
                      .ok());
      EXPECT_LE(NormwiseError(GetF32(df, m * n), RefGemm(ta, tb, m, n, k, a, b, 1.0f, c)),
                kF32Tol)
          << "f32 ta=" << ta << " tb=" << tb;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, GemmTest,
                         ::testing::Values(GemmBackend::kCublasLt, GemmBackend::kCublasGemmEx));

TEST_F(KernelsTest, GemmRejectsBadShapeNamingOp) {
  DeviceBuffer a = Bf16(std::vector<float>(16, 1.0f));
  const absl::Status s = dev_->gemm().Run(false, false, 4, 4, 4, a.as<bf16>(), 2, a.as<bf16>(),
                                          4, 0.0f, nullptr, a.get(), 4, GemmOut::kBf16, st_,
                                          "my op");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("my op"), std::string::npos) << s;
}

TEST_F(KernelsTest, AllocatorBudgetIsEnforced) {
  CudaDeviceOptions o;
  o.budget_bytes = 64 << 20;
  o.gemm_workspace_bytes = 1 << 20;
  auto small = CudaDevice::Create(o);
  ASSERT_TRUE(small.ok()) << small.status();
  auto ok = (*small)->Allocate(32 << 20, "first");
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto over = (*small)->Allocate(40 << 20, "forward of layer 3: parameters");
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over.status().message().find("forward of layer 3: parameters"), std::string::npos);
  EXPECT_NE(over.status().message().find("41943040 bytes"), std::string::npos)
      << over.status();
  ok->Reset();
  EXPECT_TRUE((*small)->Allocate(40 << 20, "after release").ok());
  EXPECT_LE((*small)->peak(), 64 << 20);
}

// The planner's figures of the device: every one measured, within what any supported card
// can do (bf16 dense peaks run from ~165 TFLOP/s on an RTX 4090 to ~990 on an H100/H200; PCIe
// and NVLink-C2C host links below 1 TB/s; HBM below 10 TB/s).
TEST_F(KernelsTest, MeasureDeviceFiguresArePlausible) {
  auto figures = MeasureDevice(dev_.get());
  ASSERT_TRUE(figures.ok()) << figures.status();
  for (const auto& [key, value] : *figures) std::printf("%s %.4g\n", key.c_str(), value);
  ASSERT_EQ(figures->size(), 4u);
  EXPECT_GT(figures->at("bf16_gemm_flops"), 2e13);
  EXPECT_LT(figures->at("bf16_gemm_flops"), 2.5e15);
  for (const char* link : {"h2d_bytes_per_s", "d2h_bytes_per_s"}) {
    EXPECT_GT(figures->at(link), 1e9) << link;
    EXPECT_LT(figures->at(link), 1e12) << link;
  }
  EXPECT_GT(figures->at("copy_bytes_per_s"), 1e11);
  EXPECT_LT(figures->at("copy_bytes_per_s"), 1e13);
}

TEST_F(KernelsTest, Embedding) {
  const int64_t vocab = 50, c = 72, n = 120;  // rows repeat: the backward accumulates
  const auto table = RandomBf16Values(vocab * c, 1.0f, 4);
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 13 + 5) % vocab);
  DeviceBuffer dt = Bf16(table), di = Raw(ids), dout = Bf16(std::vector<float>(n * c));
  ASSERT_TRUE(kernels::EmbeddingForward(dt.as<bf16>(), di.as<int32_t>(), n, c, dout.as<bf16>(),
                                        st_)
                  .ok());
  std::vector<float> want(n * c);
  engine::kernels::EmbeddingForward(table.data(), ids.data(), n, c, want.data(), nullptr);
  EXPECT_EQ(NormwiseError(GetBf16(dout, n * c), want), 0.0);

  const auto dy = RandomBf16Values(n * c, 1.0f, 5);
  const auto dtab0 = RandomBf16Values(vocab * c, 1.0f, 6);
  DeviceBuffer ddy = Bf16(dy), dgrad = F32(dtab0);
  ASSERT_TRUE(kernels::EmbeddingBackward(ddy.as<bf16>(), di.as<int32_t>(), n, c,
                                         dgrad.as<float>(), st_)
                  .ok());
  std::vector<float> gwant = dtab0;
  engine::kernels::EmbeddingBackward(dy.data(), ids.data(), n, c, gwant.data(), nullptr);
  EXPECT_LE(NormwiseError(GetF32(dgrad, vocab * c), gwant), kF32Tol);
}

TEST_F(KernelsTest, RmsNorm) {
  const int64_t n = 150, c = 320;  // 3 chunks of rows for dw, the last one partial
  const float eps = 1e-5f;
  const auto x = RandomBf16Values(n * c, 1.5f, 7);
  auto w = RandomBf16Values(c, 0.2f, 8);
  for (float& v : w) v = gpu_test::RoundBf16(1.0f + v);
  DeviceBuffer dx = Bf16(x), dw = Bf16(w), dy = Bf16(std::vector<float>(n * c)),
               dr = F32(std::vector<float>(n));
  ASSERT_TRUE(kernels::RmsNormForward(dx.as<bf16>(), dw.as<bf16>(), n, c, eps, dy.as<bf16>(),
                                      dr.as<float>(), st_)
                  .ok());
  std::vector<float> y(n * c), rstd(n);
  engine::kernels::RmsNormForward(x.data(), w.data(), n, c, eps, y.data(), rstd.data(), nullptr);
  EXPECT_LE(NormwiseError(GetBf16(dy, n * c), y), kBf16Tol);
  EXPECT_LE(NormwiseError(GetF32(dr, n), rstd), kF32Tol);

  // Backward with a residual, dx aliasing the residual (as the model does).
  const auto g = RandomBf16Values(n * c, 1.0f, 9);
  const auto res = RandomBf16Values(n * c, 1.0f, 10);
  const auto dw0 = RandomBf16Values(c, 1.0f, 11);
  DeviceBuffer dg = Bf16(g), dres = Bf16(res), ddw = F32(dw0), drs = F32(rstd);
  ASSERT_TRUE(kernels::RmsNormBackward(dg.as<bf16>(), dx.as<bf16>(), dw.as<bf16>(),
                                       drs.as<float>(), n, c, dres.as<bf16>(), dres.as<bf16>(),
                                       ddw.as<float>(), st_)
                  .ok());
  std::vector<float> want_dx = res, want_dw = dw0;
  engine::kernels::RmsNormBackward(g.data(), x.data(), w.data(), rstd.data(), n, c,
                                   want_dx.data(), true, want_dw.data(), nullptr);
  EXPECT_LE(NormwiseError(GetBf16(dres, n * c), want_dx), kBf16Tol);
  EXPECT_LE(NormwiseError(GetF32(ddw, c), want_dw), kF32Tol);
}

TEST_F(KernelsTest, RopeBothDirections) {
  const int64_t batch = 2, seq = 19, heads = 3, d = 64, stride = heads * d + 64;
  const int64_t rows = batch * seq;
  std::vector<float> cs(seq * d / 2), sn(seq * d / 2);
  engine::kernels::RopeTables<float>(seq, d, 10000.0, cs.data(), sn.data());
  DeviceBuffer dcs = F32(cs), dsn = F32(sn);
  for (auto dir : {kernels::RopeDirection::kForward, kernels::RopeDirection::kInverse}) {
    const auto x = RandomBf16Values(rows * stride, 1.0f, 12);
    DeviceBuffer dx = Bf16(x);
    ASSERT_TRUE(kernels::Rope(dx.as<bf16>(), rows, stride, seq, heads, d, dcs.as<float>(),
                              dsn.as<float>(), dir, st_)
                    .ok());
    // CPU Rope works on packed rows: pack, rotate, compare the head columns.
    std::vector<float> packed(rows * heads * d);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(x.begin() + r * stride, x.begin() + r * stride + heads * d,
                packed.begin() + r * heads * d);
    }
    engine::kernels::Rope(packed.data(), rows, seq, heads, d, 0, cs.data(), sn.data(),
                          dir == kernels::RopeDirection::kInverse, nullptr);
    const auto got = GetBf16(dx, rows * stride);
    std::vector<float> got_packed(rows * heads * d);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(got.begin() + r * stride, got.begin() + r * stride + heads * d,
                got_packed.begin() + r * heads * d);
      // Columns past the heads are untouched.
      for (int64_t j = heads * d; j < stride; ++j) ASSERT_EQ(got[r * stride + j], x[r * stride + j]);
    }
    EXPECT_LE(NormwiseError(got_packed, packed), kBf16Tol);
  }
}

TEST_F(KernelsTest, SwiGlu) {
  const int64_t n = 29, inter = 200;
  const auto gu = RandomBf16Values(n * 2 * inter, 2.0f, 13);
  std::vector<float> g(n * inter), u(n * inter);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < inter; ++j) {
      g[r * inter + j] = gu[r * 2 * inter + j];
      u[r * inter + j] = gu[r * 2 * inter + inter + j];
    }
  }
  DeviceBuffer dgu = Bf16(gu), dm = Bf16(std::vector<float>(n * inter));
  ASSERT_TRUE(kernels::SwiGluForward(dgu.as<bf16>(), n, inter, dm.as<bf16>(), st_).ok());
  std::vector<float> m(n * inter);
  engine::kernels::SwiGluForward(g.data(), u.data(), n * inter, m.data(), nullptr);
  EXPECT_LE(NormwiseError(GetBf16(dm, n * inter), m), kBf16Tol);

  const auto dmv = RandomBf16Values(n * inter, 1.0f, 14);
  DeviceBuffer ddm = Bf16(dmv), ddgu = Bf16(std::vector<float>(n * 2 * inter));
  ASSERT_TRUE(
      kernels::SwiGluBackward(ddm.as<bf16>(), dgu.as<bf16>(), n, inter, ddgu.as<bf16>(), st_)
          .ok());
  std::vector<float> dg(n * inter), du(n * inter);
  engine::kernels::SwiGluBackward(dmv.data(), g.data(), u.data(), n * inter, dg.data(),
                                  du.data(), nullptr);
  const auto got = GetBf16(ddgu, n * 2 * inter);
  std::vector<float> got_g(n * inter), got_u(n * inter);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < inter; ++j) {
      got_g[r * inter + j] = got[r * 2 * inter + j];
      got_u[r * inter + j] = got[r * 2 * inter + inter + j];
    }
  }
  EXPECT_LE(NormwiseError(got_g, dg), kBf16Tol);
  EXPECT_LE(NormwiseError(got_u, du), kBf16Tol);
}

TEST_F(KernelsTest, CrossEntropy) {
  // 100: warps with no column; ld > vocab: padding the kernel must leave alone.
  for (int64_t vocab : {int64_t{100}, int64_t{1000}, int64_t{32003}}) {
    const int64_t n = 21, ld = vocab + 16;
    const auto logits = RandomBf16Values(n * ld, 3.0f, 15);
    std::vector<int32_t> targets(n);
    for (int64_t i = 0; i < n; ++i) targets[i] = static_cast<int32_t>((i * 997) % vocab);
    std::vector<float> packed(n * vocab);
    for (int64_t r = 0; r < n; ++r) {
      std::copy(logits.begin() + r * ld, logits.begin() + r * ld + vocab,
                packed.begin() + r * vocab);
    }
    for (float scale : {0.25f, 0.0f}) {  // 0: losses only, logits untouched
      DeviceBuffer dl = Bf16(logits), dt = Raw(targets), dloss = F32(std::vector<float>(n));
      ASSERT_TRUE(kernels::CrossEntropy(dl.as<bf16>(), ld, dt.as<int32_t>(), n, vocab, scale,
                                        dloss.as<float>(), st_)
                      .ok());
      std::vector<float> want_grad = packed;
      std::vector<double> losses(n);
      engine::kernels::CrossEntropy(want_grad.data(), targets.data(), n, vocab, scale,
                                    losses.data(), nullptr);
      const std::vector<float> want_loss(losses.begin(), losses.end());
      EXPECT_LE(NormwiseError(GetF32(dloss, n), want_loss), kF32Tol)
          << "vocab " << vocab << " scale " << scale;
      const auto got = GetBf16(dl, n * ld);
      std::vector<float> got_packed(n * vocab);
      for (int64_t r = 0; r < n; ++r) {
        std::copy(got.begin() + r * ld, got.begin() + r * ld + vocab,
                  got_packed.begin() + r * vocab);
        for (int64_t j = vocab; j < ld; ++j) {
          ASSERT_EQ(got[r * ld + j], logits[r * ld + j]) << "padding of row " << r;
        }
      }
      EXPECT_LE(NormwiseError(got_packed, want_grad), scale == 0.0f ? 0.0 : kBf16Tol)
          << "vocab " << vocab << " scale " << scale;
    }
  }
}

// The log-sum-exp CrossEntropy returns, and the gradient of a block of columns from it
// (the LM head's weight gradient in vocabulary blocks), against the CPU's full gradient.
TEST_F(KernelsTest, CrossEntropyGradientByColumnBlocks) {
  const int64_t n = 13, vocab = 1000, ld = vocab;
  const auto logits = RandomBf16Values(n * vocab, 3.0f, 16);
  std::vector<int32_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = static_cast<int32_t>((i * 331) % vocab);
  const float scale = 0.125f;
  DeviceBuffer dl = Bf16(logits), dt = Raw(targets), dloss = F32(std::vector<float>(n)),
               dlse = F32(std::vector<float>(n));
  ASSERT_TRUE(kernels::CrossEntropy(dl.as<bf16>(), ld, dt.as<int32_t>(), n, vocab, 0.0f,
                                    dloss.as<float>(), st_, dlse.as<float>())
                  .ok());
  std::vector<float> want_lse(n);
  for (int64_t r = 0; r < n; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, double{logits[r * vocab + j]});
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(logits[r * vocab + j] - mx);
    want_lse[r] = static_cast<float>(mx + std::log(sum));
  }
  const auto lse = GetF32(dlse, n);
  EXPECT_LE(NormwiseError(lse, want_lse), kF32Tol);
  std::vector<float> want_grad = logits;
  std::vector<double> losses(n);
  engine::kernels::CrossEntropy(want_grad.data(), targets.data(), n, vocab, scale, losses.data(),
                                nullptr);
  // Three uneven blocks of columns, each from its own copy of its logits.
  for (auto [v0, vb] : {std::pair<int64_t, int64_t>{0, 400}, {400, 344}, {744, 256}}) {
    std::vector<float> block(n * vb), want(n * vb);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < vb; ++j) {
        block[r * vb + j] = logits[r * vocab + v0 + j];
        want[r * vb + j] = want_grad[r * vocab + v0 + j];
      }
    }
    DeviceBuffer db = Bf16(block);
    ASSERT_TRUE(kernels::CrossEntropyGradColumns(db.as<bf16>(), vb, dlse.as<float>(),
                                                 dt.as<int32_t>(), n, v0, vb, scale, st_)
                    .ok());
    EXPECT_LE(NormwiseError(GetBf16(db, n * vb), want), kBf16Tol) << "columns from " << v0;
  }
}

struct AttentionCase {
  int64_t batch, seq, heads, kv_heads, head_dim;
};

class AttentionTest
    : public KernelsTest,
      public ::testing::WithParamInterface<std::tuple<AttentionCase, kernels::AttentionKernel>> {};

TEST_P(AttentionTest, ForwardAndBackwardMatchReference) {
  const AttentionCase p = std::get<0>(GetParam());
  const kernels::AttentionKernel kernel = std::get<1>(GetParam());
  if (kernel == kernels::AttentionKernel::kTensorCores &&
      !kernels::internal::TensorCoreAttentionFits(p.head_dim)) {
    GTEST_SKIP() << "tensor-core attention does not fit this device for head_dim " << p.head_dim;
  }
  const int64_t n = p.batch * p.seq, qd = p.heads * p.head_dim, kd = p.kv_heads * p.head_dim;
  const int64_t ld = qd + 2 * kd;
  const auto qkv = RandomBf16Values(n * ld, 1.0f, 16);
  std::vector<float> q(n * qd), k(n * kd), v(n * kd);
  for (int64_t r = 0; r < n; ++r) {
    std::copy(qkv.begin() + r * ld, qkv.begin() + r * ld + qd, q.begin() + r * qd);
    std::copy(qkv.begin() + r * ld + qd, qkv.begin() + r * ld + qd + kd, k.begin() + r * kd);
    std::copy(qkv.begin() + r * ld + qd + kd, qkv.begin() + (r + 1) * ld, v.begin() + r * kd);
  }
  DeviceBuffer dqkv = Bf16(qkv), dout = Bf16(std::vector<float>(n * qd)),
               dlse = F32(std::vector<float>(p.batch * p.heads * p.seq));
  const bf16* base = dqkv.as<bf16>();
  const kernels::QkvView view{base, base + qd, base + qd + kd, ld};
  const kernels::AttentionShape shape{p.batch, p.seq, p.heads, p.kv_heads, p.head_dim};
  ASSERT_TRUE(
      kernels::AttentionForward(view, shape, dout.as<bf16>(), dlse.as<float>(), st_, kernel).ok());
  std::vector<float> probs(p.batch * p.heads * p.seq * p.seq), out(n * qd);
  engine::kernels::AttentionForward(q.data(), k.data(), v.data(), p.batch, p.seq, p.heads,
                                    p.kv_heads, p.head_dim, probs.data(), out.data(), nullptr);
  const auto got_out = GetBf16(dout, n * qd);
  EXPECT_LE(NormwiseError(got_out, out), kBf16Tol);

  // Backward from the GPU's own (bf16) output, as the model does.
  const auto g = RandomBf16Values(n * qd, 1.0f, 17);
  DeviceBuffer dg = Bf16(g), ddelta = F32(std::vector<float>(p.batch * p.heads * p.seq)),
               dd = Bf16(std::vector<float>(n * ld));
  bf16* d = dd.as<bf16>();
  ASSERT_TRUE(kernels::AttentionBackward(view, shape, dout.as<bf16>(), dg.as<bf16>(),
                                         dlse.as<float>(), ddelta.as<float>(), d, d + qd,
                                         d + qd + kd, ld, st_, kernel)
                  .ok());
  std::vector<float> dprobs(probs.size()), dq(n * qd), dk(n * kd), dv(n * kd);
  engine::kernels::AttentionBackward(g.data(), q.data(), k.data(), v.data(), probs.data(),
                                     p.batch, p.seq, p.heads, p.kv_heads, p.head_dim,
                                     dprobs.data(), dq.data(), dk.data(), dv.data(), nullptr);
  const auto got = GetBf16(dd, n * ld);
  std::vector<float> gq(n * qd), gk(n * kd), gv(n * kd);
  for (int64_t r = 0; r < n; ++r) {
    std::copy(got.begin() + r * ld, got.begin() + r * ld + qd, gq.begin() + r * qd);
    std::copy(got.begin() + r * ld + qd, got.begin() + r * ld + qd + kd, gk.begin() + r * kd);
    std::copy(got.begin() + r * ld + qd + kd, got.begin() + (r + 1) * ld, gv.begin() + r * kd);
  }
  EXPECT_LE(NormwiseError(gq, dq), kBf16Tol);
  EXPECT_LE(NormwiseError(gk, dk), kBf16Tol);
  EXPECT_LE(NormwiseError(gv, dv), kBf16Tol);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Combine(::testing::Values(AttentionCase{2, 100, 4, 2, 32},
                                         AttentionCase{1, 130, 4, 4, 64},
                                         AttentionCase{2, 64, 8, 2, 128},
                                         AttentionCase{1, 257, 2, 1, 128},
                                         // seq 5: warps whose 16 rows are all past the end
                                         AttentionCase{1, 5, 2, 1, 64}),
                       ::testing::Values(kernels::AttentionKernel::kCudaCores,
                                         kernels::AttentionKernel::kTensorCores,
                                         kernels::AttentionKernel::kAuto)));

TEST_F(KernelsTest, AttentionRejectsUnsupportedHeadDim) {
  DeviceBuffer b = Bf16(std::vector<float>(1024));
  const kernels::QkvView view{b.as<bf16>(), b.as<bf16>(), b.as<bf16>(), 96};
  const absl::Status s = kernels::AttentionForward(view, {1, 4, 2, 2, 48}, b.as<bf16>(),
                                                   b.as<float>(), st_);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("head_dim=48"), std::string::npos) << s;
}

TEST_F(KernelsTest, AdamWMatchesCpuOverSteps) {
  const int64_t n = 10007;
  auto p = RandomBf16Values(n, 0.05f, 18);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  DeviceBuffer dp = F32(p), dm = F32(m), dv = F32(v), dbf = Bf16(std::vector<float>(n));
  engine::AdamWHyper h;
  h.lr = 1e-3;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  for (int64_t step = 1; step <= 5; ++step) {
    auto g = RandomBf16Values(n, 0.01f, 100 + step);
    DeviceBuffer dg = F32(g);
    const double clip = step == 3 ? 0.5 : 1.0;
    ASSERT_TRUE(kernels::AdamW(dp.as<float>(), dg.as<float>(), dm.as<float>(), dv.as<float>(),
                               dbf.as<bf16>(), n,
                               kernels::MakeAdamWScalars(h.lr, h.beta1, h.beta2, h.eps,
                                                         h.weight_decay, step, clip),
                               st_)
                    .ok());
    if (clip != 1.0) {
      for (float& x : g) x *= static_cast<float>(clip);
    }
    engine::AdamWUpdate(p.data(), g.data(), m.data(), v.data(), n, h, step);
  }
  EXPECT_LE(NormwiseError(GetF32(dp, n), p), kF32Tol);
  EXPECT_LE(NormwiseError(GetF32(dm, n), m), kF32Tol);
  EXPECT_LE(NormwiseError(GetF32(dv, n), v), kF32Tol);
  EXPECT_LE(NormwiseError(GetBf16(dbf, n), p), kBf16Tol);
}

TEST_F(KernelsTest, SumSquares) {
  const int64_t n = 100003;
  const auto x = RandomBf16Values(n, 1.0f, 19);
  DeviceBuffer dx = F32(x), acc = F32(std::vector<float>(2, 0.0f));
  ASSERT_TRUE(kernels::SumSquares(dx.as<float>(), n, acc.as<double>(), st_).ok());
  EXPECT_EQ(cudaStreamSynchronize(st_), cudaSuccess);
  double got = 0;
  ASSERT_EQ(cudaMemcpy(&got, acc.get(), 8, cudaMemcpyDeviceToHost), cudaSuccess);
  const double want = engine::GlobalGradNorm({{x.data(), n}});
  EXPECT_NEAR(std::sqrt(got), want, kF32Tol * want);
}

}  // namespace
}  // namespace lumen::cuda
