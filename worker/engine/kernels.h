// CPU compute kernels of the Llama model, templated on the element type (float for training,
// double for the gradient checks). Matrix products go to OpenBLAS, split over a ThreadPool by
// the kernels themselves (ParallelGemm, attention per (batch, kv head)) with OpenBLAS kept
// single-threaded; the rest are loops parallelised over rows (nullptr = run on the calling
// thread), float exp vectorised (simd::Exp).
// Determinism: every output element is written by exactly one thread and every reduction runs
// in a fixed order, so results are bit-identical run to run for a given thread count.
// Thread-safety: the functions are pure apart from their output arguments.
// Layouts are row-major; Linear weights are [out_features, in_features] (y = x W^T) as in
// Hugging Face.
#ifndef LUMEN_WORKER_ENGINE_KERNELS_H_
#define LUMEN_WORKER_ENGINE_KERNELS_H_

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "worker/engine/thread_pool.h"

namespace lumen::engine::kernels {

// Runs fn(begin, end) over [0, n) on `pool` (or inline when pool is nullptr).
template <typename Fn>
inline void ParallelRows(ThreadPool* pool, int64_t n, int64_t grain, const Fn& fn) {
  if (pool == nullptr || pool->num_threads() <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  pool->ParallelFor(n, grain, [&fn](int64_t b, int64_t e) { fn(b, e); });
}

// ---- Vectorised float exp ----
// std::exp is a scalar libm call per element (GCC vectorises it only under -ffast-math), and
// the softmax, cross-entropy and SiLU loops were bound by it. These helpers evaluate exp 4
// lanes at a time with GCC vector extensions (SSE2, which every x86-64 has; no -march
// needed). Each element's result depends only on its input, so they stay bit-deterministic.
namespace simd {

typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
inline constexpr int64_t kLanes = 4;

inline F4 Load(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, F4 v) { std::memcpy(p, &v, sizeof(v)); }
inline F4 Splat(float x) { return F4{} + x; }

// exp(x) per lane: Cephes' expf (range reduction by ln 2 in two parts and a degree-6
// polynomial), relative error below 2e-7. 0 for x < -87.3 (where expf goes subnormal), +inf
// for x > 88 (expf overflows at 88.72), NaN for NaN.
inline F4 Exp(F4 x) {
  const I4 under = x < Splat(-87.33654f);
  const I4 over = x > Splat(88.0f);
  x = under ? Splat(-87.33654f) : x;
  x = over ? Splat(88.0f) : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (round to nearest even).
  const F4 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const F4 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F4 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I4 bits = (__builtin_convertvector(n, I4) + 127) << 23;
  F4 y = p * reinterpret_cast<F4>(bits);  // 2^n: a vector cast keeps the bits
  y = under ? Splat(0.0f) : y;
  y = over ? Splat(std::numeric_limits<float>::infinity()) : y;
  return y;
}

// Applies fn(F4) -> F4 to src[0, n) into dst (dst may equal src); the tail is padded with
// `pad` so it goes through the same vector code.
template <typename Fn>
inline void Map(const float* src, int64_t n, float pad, float* dst, const Fn& fn) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) Store(dst + j, fn(Load(src + j)));
  if (j < n) {
    float tmp[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) tmp[l] = j + l < n ? src[j + l] : pad;
    Store(tmp, fn(Load(tmp)));
    for (int64_t l = 0; j + l < n; ++l) dst[j + l] = tmp[l];
  }
}

}  // namespace simd

// C[M,N] = alpha * op(A) op(B) + beta * C, row-major.
inline void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
              beta, c, static_cast<int>(ldc));
}
inline void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                 double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
              beta, c, static_cast<int>(ldc));
}

// C = alpha * op(A) op(B) + beta * C with the rows of C (or its columns, when C has fewer rows
// than kParallelGemmRowBlock per thread) split into one contiguous chunk per thread of `pool`,
// each chunk one Gemm call. Deterministic for a given thread count. The chunks call OpenBLAS
// concurrently, so OpenBLAS should be single-threaded when pool has more than one thread
// (LlamaModelT's constructor sees to that); pool == nullptr is one plain Gemm call.
inline constexpr int64_t kParallelGemmRowBlock = 16;
// Below this many multiply-adds a product runs as one call: splitting costs more than it saves.
inline constexpr int64_t kParallelGemmMinWork = int64_t{1} << 18;

template <typename T>
void ParallelGemm(ThreadPool* pool, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                  T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                  int64_t ldc) {
  const int threads = pool == nullptr ? 1 : pool->num_threads();
  if (threads <= 1 || m * n * k < kParallelGemmMinWork) {
    Gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t blk = kParallelGemmRowBlock;
  if (m >= threads * blk) {
    pool->ParallelFor((m + blk - 1) / blk, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * blk, r1 = std::min(m, b1 * blk);
      Gemm(trans_a, trans_b, r1 - r0, n, k, alpha, trans_a ? a + r0 : a + r0 * lda, lda, b,
           ldb, beta, c + r0 * ldc, ldc);
    });
  } else {
    pool->ParallelFor((n + blk - 1) / blk, 1, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * blk, c1 = std::min(n, b1 * blk);
      Gemm(trans_a, trans_b, m, c1 - c0, k, alpha, a, lda, trans_b ? b + c0 * ldb : b + c0, ldb,
           beta, c + c0, ldc);
    });
  }
}

// ---- Linear: y[n,out] = x[n,in] W[out,in]^T ----
template <typename T>
void LinearForward(const T* x, const T* w, int64_t n, int64_t in, int64_t out, T* y,
                   ThreadPool* pool = nullptr) {
  ParallelGemm(pool, false, true, n, out, in, T(1), x, in, w, in, T(0), y, out);
}

// dx = dy W (added to dx when accumulate_dx, skipped when dx is null);
// dw += dy^T x (skipped when dw is null).
template <typename T>
void LinearBackward(const T* dy, const T* x, const T* w, int64_t n, int64_t in, int64_t out,
                    T* dx, bool accumulate_dx, T* dw, ThreadPool* pool = nullptr) {
  if (dx != nullptr) {
    ParallelGemm(pool, false, false, n, in, out, T(1), dy, out, w, in,
                 accumulate_dx ? T(1) : T(0), dx, in);
  }
  if (dw != nullptr) {
    ParallelGemm(pool, true, false, out, in, n, T(1), dy, out, x, in, T(1), dw, in);
  }
}

// ---- Embedding ----
template <typename T>
void EmbeddingForward(const T* table, const int32_t* ids, int64_t n, int64_t c, T* out,
                      ThreadPool* pool) {
  ParallelRows(pool, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      std::memcpy(out + r * c, table + static_cast<int64_t>(ids[r]) * c, sizeof(T) * c);
    }
  });
}

// dtable[ids[r]] += dout[r], rows in increasing order (parallel over column blocks).
template <typename T>
void EmbeddingBackward(const T* dout, const int32_t* ids, int64_t n, int64_t c, T* dtable,
                       ThreadPool* pool) {
  ParallelRows(pool, c, 16, [&](int64_t cb, int64_t ce) {
    for (int64_t r = 0; r < n; ++r) {
      T* dst = dtable + static_cast<int64_t>(ids[r]) * c;
      const T* src = dout + r * c;
      for (int64_t j = cb; j < ce; ++j) dst[j] += src[j];
    }
  });
}

// ---- Reductions ----
// Sums in double accumulate in kReductionLanes independent lanes combined in a fixed order:
// one running sum is a chain of dependent adds, which made these loops latency-bound. The
// result depends only on the inputs, so it stays bit-deterministic.
inline constexpr int64_t kReductionLanes = 8;

// sum_{j < n} term(j) in double.
template <typename Term>
double LaneSum(int64_t n, const Term& term) {
  double lanes[kReductionLanes] = {};
  int64_t j = 0;
  for (; j + kReductionLanes <= n; j += kReductionLanes) {
    for (int64_t l = 0; l < kReductionLanes; ++l) lanes[l] += term(j + l);
  }
  for (int64_t l = 0; j + l < n; ++l) lanes[l] += term(j + l);
  double sum = 0;
  for (int64_t l = 0; l < kReductionLanes; ++l) sum += lanes[l];
  return sum;
}

// ---- RMSNorm (HF): y = w * (x * rsqrt(mean(x^2) + eps)) ----
template <typename T>
void RmsNormForward(const T* x, const T* w, int64_t n, int64_t c, double eps, T* y, T* rstd,
                    ThreadPool* pool) {
  ParallelRows(pool, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * c;
      const double ss =
          LaneSum(c, [xr](int64_t j) { return static_cast<double>(xr[j]) * xr[j]; });
      const T rs = static_cast<T>(1.0 / std::sqrt(ss / c + eps));
      rstd[r] = rs;
      T* yr = y + r * c;
      for (int64_t j = 0; j < c; ++j) yr[j] = w[j] * (xr[j] * rs);
    }
  });
}

// dx (+)= d/dx, dw += d/dw.
template <typename T>
void RmsNormBackward(const T* dy, const T* x, const T* w, const T* rstd, int64_t n, int64_t c,
                     T* dx, bool accumulate_dx, T* dw, ThreadPool* pool) {
  ParallelRows(pool, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * c;
      const T* dyr = dy + r * c;
      const double dot = LaneSum(
          c, [dyr, w, xr](int64_t j) { return static_cast<double>(dyr[j]) * w[j] * xr[j]; });
      const T rs = rstd[r];
      const T coef = static_cast<T>(dot * rs * rs * rs / c);
      T* dxr = dx + r * c;
      if (accumulate_dx) {
        for (int64_t j = 0; j < c; ++j) dxr[j] += rs * (w[j] * dyr[j]) - xr[j] * coef;
      } else {
        for (int64_t j = 0; j < c; ++j) dxr[j] = rs * (w[j] * dyr[j]) - xr[j] * coef;
      }
    }
  });
  ParallelRows(pool, c, 16, [&](int64_t cb, int64_t ce) {
    for (int64_t r = 0; r < n; ++r) {
      const T rs = rstd[r];
      const T* xr = x + r * c;
      const T* dyr = dy + r * c;
      for (int64_t j = cb; j < ce; ++j) dw[j] += dyr[j] * (xr[j] * rs);
    }
  });
}

// ---- RoPE (HF rotate-half) ----
// Fills cos/sin tables [num_positions, head_dim/2] for positions 0..num_positions-1, computed
// like Hugging Face: inv_freq_i = 1 / theta^(2i/d) and angle = pos * inv_freq_i in type T.
template <typename T>
void RopeTables(int64_t num_positions, int64_t head_dim, double theta, T* cos_table,
                T* sin_table) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const T inv_freq = T(1) / static_cast<T>(std::pow(static_cast<T>(theta),
                                                      static_cast<T>(2 * i) /
                                                          static_cast<T>(head_dim)));
    for (int64_t p = 0; p < num_positions; ++p) {
      const T angle = static_cast<T>(p) * inv_freq;
      cos_table[p * half + i] = static_cast<T>(std::cos(static_cast<double>(angle)));
      sin_table[p * half + i] = static_cast<T>(std::sin(static_cast<double>(angle)));
    }
  }
}

// In place on x[rows, heads, head_dim]; row r has position pos0 + r % seq_len.
// inverse = false: x' = x*cos + rotate_half(x)*sin; inverse = true applies the transpose
// (the backward pass).
template <typename T>
void Rope(T* x, int64_t rows, int64_t seq_len, int64_t heads, int64_t head_dim, int64_t pos0,
          const T* cos_table, const T* sin_table, bool inverse, ThreadPool* pool) {
  const int64_t half = head_dim / 2;
  ParallelRows(pool, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t pos = pos0 + r % seq_len;
      const T* cs = cos_table + pos * half;
      const T* sn = sin_table + pos * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + (r * heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const T a = v[i], bb = v[i + half];
          if (!inverse) {
            v[i] = a * cs[i] - bb * sn[i];
            v[i + half] = bb * cs[i] + a * sn[i];
          } else {
            v[i] = a * cs[i] + bb * sn[i];
            v[i + half] = bb * cs[i] - a * sn[i];
          }
        }
      }
    }
  });
}

// ---- Row max and sum of exp (softmax, cross-entropy) ----
// Row max and sum of exp(row - max) with kLanes independent accumulators, combined in a fixed
// order: the dependency chain of one running sum made these loops latency-bound at large
// vocabularies. The result depends only on the row, so it stays bit-deterministic.
inline constexpr int64_t kCrossEntropyLanes = 8;

template <typename T>
T RowMax(const T* row, int64_t n) {
  T lanes[kCrossEntropyLanes];
  for (int64_t l = 0; l < kCrossEntropyLanes; ++l) lanes[l] = row[0];
  int64_t j = 0;
  for (; j + kCrossEntropyLanes <= n; j += kCrossEntropyLanes) {
    for (int64_t l = 0; l < kCrossEntropyLanes; ++l) {
      lanes[l] = lanes[l] < row[j + l] ? row[j + l] : lanes[l];
    }
  }
  T mx = lanes[0];
  for (int64_t l = 1; l < kCrossEntropyLanes; ++l) mx = std::max(mx, lanes[l]);
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// Returns sum_j exp(row[j] - mx) in double; when `out` is not null also stores each
// exp(row[j] - mx) (in T) there (out may equal row).
template <typename T>
double SumExp(const T* row, int64_t n, T mx, T* out) {
  double lanes[kCrossEntropyLanes] = {};
  int64_t j = 0;
  for (; j + kCrossEntropyLanes <= n; j += kCrossEntropyLanes) {
    for (int64_t l = 0; l < kCrossEntropyLanes; ++l) {
      const T e = std::exp(row[j + l] - mx);
      if (out != nullptr) out[j + l] = e;
      lanes[l] += e;
    }
  }
  double sum = 0;
  for (int64_t l = 0; l < kCrossEntropyLanes; ++l) sum += lanes[l];
  for (; j < n; ++j) {
    const T e = std::exp(row[j] - mx);
    if (out != nullptr) out[j] = e;
    sum += e;
  }
  return sum;
}

// The float version evaluates exp with simd::Exp; the lanes are as above.
template <>
inline double SumExp<float>(const float* row, int64_t n, float mx, float* out) {
  constexpr int64_t kBlock = kCrossEntropyLanes;  // two vectors
  static_assert(kBlock == 2 * simd::kLanes);
  double lanes[kBlock] = {};
  const simd::F4 shift = simd::Splat(mx);
  // exp of src[0, kBlock) into dst, summing the first `valid` into the lanes.
  auto block = [&](const float* src, float* dst, int64_t valid) {
    float t[kBlock];
    simd::Store(t, simd::Exp(simd::Load(src) - shift));
    simd::Store(t + simd::kLanes, simd::Exp(simd::Load(src + simd::kLanes) - shift));
    for (int64_t l = 0; l < valid; ++l) lanes[l] += t[l];
    if (dst != nullptr) std::memcpy(dst, t, sizeof(float) * valid);
  };
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) block(row + j, out == nullptr ? nullptr : out + j, kBlock);
  if (j < n) {
    float tmp[kBlock];
    for (int64_t l = 0; l < kBlock; ++l) tmp[l] = j + l < n ? row[j + l] : mx;
    block(tmp, out == nullptr ? nullptr : out + j, n - j);
  }
  double sum = 0;
  for (int64_t l = 0; l < kBlock; ++l) sum += lanes[l];
  return sum;
}

// ---- Causal grouped-query attention over full sequences ----
// Queries are processed in tiles of kAttentionTile rows; a tile's scores are computed only for
// the keys up to its last row, so the fully masked blocks above the diagonal cost nothing.
// Work is split over (batch, kv head) pairs on the pool, each running single-threaded Gemms.
inline constexpr int64_t kAttentionTile = 64;

// q[B*T, H*D], k,v[B*T, KV*D]; out[B*T, H*D]. Query head h uses key/value head h / (H/KV).
// probs[B, H, T, T] receives the softmax of each row i in columns 0..i and zeros in columns
// i+1 .. (end of i's query tile); columns past the tile's last row are left untouched (the
// backward reads exactly the same region).
template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, int64_t batch, int64_t seq,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, T* probs, T* out,
                      ThreadPool* pool) {
  const int64_t group = heads / kv_heads;
  const int64_t qs = heads * head_dim, ks = kv_heads * head_dim;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  ParallelRows(pool, batch * kv_heads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t task = tb; task < te; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const T* kb = k + b * seq * ks + kvh * head_dim;
      const T* vb = v + b * seq * ks + kvh * head_dim;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        T* pb = probs + (b * heads + h) * seq * seq;
        for (int64_t r0 = 0; r0 < seq; r0 += kAttentionTile) {
          const int64_t rows = std::min(kAttentionTile, seq - r0), kend = r0 + rows;
          T* pt = pb + r0 * seq;
          Gemm(false, true, rows, kend, head_dim, scale, q + (b * seq + r0) * qs + h * head_dim,
               qs, kb, ks, T(0), pt, seq);
          for (int64_t i = r0; i < kend; ++i) {
            T* row = pb + i * seq;
            const double sum = SumExp(row, i + 1, RowMax(row, i + 1), row);
            const T inv = static_cast<T>(1.0 / sum);
            for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
            for (int64_t j = i + 1; j < kend; ++j) row[j] = T(0);
          }
          Gemm(false, false, rows, head_dim, kend, T(1), pt, seq, vb, ks, T(0),
               out + (b * seq + r0) * qs + h * head_dim, qs);
        }
      }
    }
  });
}

// Backward of AttentionForward. dprobs is scratch of the size of probs. dq, dk, dv are
// overwritten. Key/value gradients of a group are summed over its query heads in order.
template <typename T>
void AttentionBackward(const T* dout, const T* q, const T* k, const T* v, const T* probs,
                       int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, T* dprobs, T* dq, T* dk, T* dv, ThreadPool* pool) {
  const int64_t group = heads / kv_heads;
  const int64_t qs = heads * head_dim, ks = kv_heads * head_dim;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  ParallelRows(pool, batch * kv_heads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t task = tb; task < te; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t kvo = b * seq * ks + kvh * head_dim;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const T* pb = probs + (b * heads + h) * seq * seq;
        T* db = dprobs + (b * heads + h) * seq * seq;
        const int64_t qo = b * seq * qs + h * head_dim;
        for (int64_t r0 = 0; r0 < seq; r0 += kAttentionTile) {
          const int64_t rows = std::min(kAttentionTile, seq - r0), kend = r0 + rows;
          Gemm(false, true, rows, kend, head_dim, T(1), dout + qo + r0 * qs, qs, v + kvo, ks,
               T(0), db + r0 * seq, seq);
          // dS = P * (dP - rowsum(P * dP)) * scale, stored over dP.
          for (int64_t i = r0; i < kend; ++i) {
            const T* p = pb + i * seq;
            T* d = db + i * seq;
            const T dt = static_cast<T>(
                LaneSum(i + 1, [p, d](int64_t j) { return static_cast<double>(p[j]) * d[j]; }));
            for (int64_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - dt) * scale;
            for (int64_t j = i + 1; j < kend; ++j) d[j] = T(0);
          }
          Gemm(false, false, rows, head_dim, kend, T(1), db + r0 * seq, seq, k + kvo, ks, T(0),
               dq + qo + r0 * qs, qs);
        }
        // Key tile c0 gets contributions from the query rows c0..seq-1.
        const T beta = (h == kvh * group) ? T(0) : T(1);
        for (int64_t c0 = 0; c0 < seq; c0 += kAttentionTile) {
          const int64_t cols = std::min(kAttentionTile, seq - c0);
          Gemm(true, false, cols, head_dim, seq - c0, T(1), db + c0 * seq + c0, seq,
               q + qo + c0 * qs, qs, beta, dk + kvo + c0 * ks, ks);
          Gemm(true, false, cols, head_dim, seq - c0, T(1), pb + c0 * seq + c0, seq,
               dout + qo + c0 * qs, qs, beta, dv + kvo + c0 * ks, ks);
        }
      }
    }
  });
}

// ---- SwiGLU: m = silu(g) * u ----
template <typename T>
inline T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
void SwiGluForward(const T* g, const T* u, int64_t n, T* m, ThreadPool* pool) {
  ParallelRows(pool, n, 4096, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, float>) {
      simd::Map(g + b, e - b, 0.0f, m + b, [](simd::F4 x) { return x / (1.0f + simd::Exp(-x)); });
      for (int64_t i = b; i < e; ++i) m[i] *= u[i];
    } else {
      for (int64_t i = b; i < e; ++i) m[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
    }
  });
}

template <typename T>
void SwiGluBackward(const T* dm, const T* g, const T* u, int64_t n, T* dg, T* du,
                    ThreadPool* pool) {
  ParallelRows(pool, n, 4096, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, float>) {
      using simd::F4;
      auto step = [](F4 gv, F4 dmv, F4 uv, F4* dgv, F4* duv) {
        const F4 s = 1.0f / (1.0f + simd::Exp(-gv));
        *duv = dmv * (gv * s);
        *dgv = dmv * uv * (s * (1.0f + gv * (1.0f - s)));
      };
      int64_t i = b;
      for (; i + simd::kLanes <= e; i += simd::kLanes) {
        F4 dgv, duv;
        step(simd::Load(g + i), simd::Load(dm + i), simd::Load(u + i), &dgv, &duv);
        simd::Store(dg + i, dgv);
        simd::Store(du + i, duv);
      }
      if (i < e) {
        float tg[simd::kLanes] = {}, tdm[simd::kLanes] = {}, tu[simd::kLanes] = {};
        for (int64_t l = 0; i + l < e; ++l) {
          tg[l] = g[i + l];
          tdm[l] = dm[i + l];
          tu[l] = u[i + l];
        }
        F4 dgv, duv;
        step(simd::Load(tg), simd::Load(tdm), simd::Load(tu), &dgv, &duv);
        simd::Store(tg, dgv);
        simd::Store(tu, duv);
        for (int64_t l = 0; i + l < e; ++l) {
          dg[i + l] = tg[l];
          du[i + l] = tu[l];
        }
      }
    } else {
      for (int64_t i = b; i < e; ++i) {
        const T s = Sigmoid(g[i]);
        const T silu = g[i] * s;
        du[i] = dm[i] * silu;
        dg[i] = dm[i] * u[i] * (s * (T(1) + g[i] * (T(1) - s)));
      }
    }
  });
}

// ---- Cross-entropy ----
// losses[r] = logsumexp(logits[r]) - logits[r, targets[r]]. When grad_scale != 0, logits are
// overwritten with grad_scale * (softmax(logits[r]) - onehot(targets[r])).
template <typename T>
void CrossEntropy(T* logits, const int32_t* targets, int64_t n, int64_t vocab, T grad_scale,
                  double* losses, ThreadPool* pool) {
  ParallelRows(pool, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* row = logits + r * vocab;
      const int64_t t = targets[r];
      const T mx = RowMax(row, vocab);
      const T target_logit = row[t];
      const bool grad = grad_scale != T(0);
      const double sum = SumExp(row, vocab, mx, grad ? row : nullptr);
      losses[r] = static_cast<double>(mx) + std::log(sum) - static_cast<double>(target_logit);
      if (!grad) continue;
      const T scale = static_cast<T>(1.0 / sum) * grad_scale;
      for (int64_t j = 0; j < vocab; ++j) row[j] *= scale;
      row[t] -= grad_scale;
    }
  });
}

}  // namespace lumen::engine::kernels

#endif  // LUMEN_WORKER_ENGINE_KERNELS_H_
