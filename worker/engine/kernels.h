// CPU compute kernels of the Llama model, templated on the element type (float for training,
// double for the gradient checks). Matrix products go to OpenBLAS; the rest are plain loops
// parallelised over rows with a ThreadPool (nullptr = run on the calling thread).
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

// ---- Linear: y[n,out] = x[n,in] W[out,in]^T ----
template <typename T>
void LinearForward(const T* x, const T* w, int64_t n, int64_t in, int64_t out, T* y) {
  Gemm(false, true, n, out, in, T(1), x, in, w, in, T(0), y, out);
}

// dx = dy W (added to dx when accumulate_dx, skipped when dx is null);
// dw += dy^T x (skipped when dw is null).
template <typename T>
void LinearBackward(const T* dy, const T* x, const T* w, int64_t n, int64_t in, int64_t out,
                    T* dx, bool accumulate_dx, T* dw) {
  if (dx != nullptr) {
    Gemm(false, false, n, in, out, T(1), dy, out, w, in, accumulate_dx ? T(1) : T(0), dx, in);
  }
  if (dw != nullptr) Gemm(true, false, out, in, n, T(1), dy, out, x, in, T(1), dw, in);
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

// ---- RMSNorm (HF): y = w * (x * rsqrt(mean(x^2) + eps)) ----
template <typename T>
void RmsNormForward(const T* x, const T* w, int64_t n, int64_t c, double eps, T* y, T* rstd,
                    ThreadPool* pool) {
  ParallelRows(pool, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * c;
      double ss = 0;
      for (int64_t j = 0; j < c; ++j) ss += static_cast<double>(xr[j]) * xr[j];
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
      double dot = 0;
      for (int64_t j = 0; j < c; ++j) dot += static_cast<double>(dyr[j]) * w[j] * xr[j];
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

// ---- Causal grouped-query attention over full sequences ----
// q[B*T, H*D], k,v[B*T, KV*D]; probs[B, H, T, T] (softmax, zero above the diagonal);
// out[B*T, H*D]. Query head h uses key/value head h / (H/KV).
template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, int64_t batch, int64_t seq,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, T* probs, T* out,
                      ThreadPool* pool) {
  const int64_t group = heads / kv_heads;
  const int64_t qs = heads * head_dim, ks = kv_heads * head_dim;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      Gemm(false, true, seq, seq, head_dim, scale, q + b * seq * qs + h * head_dim, qs,
           k + b * seq * ks + (h / group) * head_dim, ks, T(0),
           probs + (b * heads + h) * seq * seq, seq);
    }
  }
  ParallelRows(pool, batch * heads * seq, 64, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t i = r % seq;
      T* row = probs + r * seq;
      T mx = row[0];
      for (int64_t j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const T inv = static_cast<T>(1.0 / sum);
      for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
      for (int64_t j = i + 1; j < seq; ++j) row[j] = T(0);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      Gemm(false, false, seq, head_dim, seq, T(1), probs + (b * heads + h) * seq * seq, seq,
           v + b * seq * ks + (h / group) * head_dim, ks, T(0),
           out + b * seq * qs + h * head_dim, qs);
    }
  }
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
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      Gemm(false, true, seq, seq, head_dim, T(1), dout + b * seq * qs + h * head_dim, qs,
           v + b * seq * ks + (h / group) * head_dim, ks, T(0),
           dprobs + (b * heads + h) * seq * seq, seq);
    }
  }
  // dS = P * (dP - rowsum(P * dP)) * scale, stored over dP.
  ParallelRows(pool, batch * heads * seq, 64, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t i = r % seq;
      const T* p = probs + r * seq;
      T* d = dprobs + r * seq;
      double dot = 0;
      for (int64_t j = 0; j <= i; ++j) dot += static_cast<double>(p[j]) * d[j];
      const T dt = static_cast<T>(dot);
      for (int64_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - dt) * scale;
      for (int64_t j = i + 1; j < seq; ++j) d[j] = T(0);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const T* ds = dprobs + (b * heads + h) * seq * seq;
      const T* p = probs + (b * heads + h) * seq * seq;
      const int64_t kvo = b * seq * ks + (h / group) * head_dim;
      const int64_t qo = b * seq * qs + h * head_dim;
      const T beta = (h % group == 0) ? T(0) : T(1);
      Gemm(false, false, seq, head_dim, seq, T(1), ds, seq, k + kvo, ks, T(0), dq + qo, qs);
      Gemm(true, false, seq, head_dim, seq, T(1), ds, seq, q + qo, qs, beta, dk + kvo, ks);
      Gemm(true, false, seq, head_dim, seq, T(1), p, seq, dout + qo, qs, beta, dv + kvo, ks);
    }
  }
}

// ---- SwiGLU: m = silu(g) * u ----
template <typename T>
inline T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
void SwiGluForward(const T* g, const T* u, int64_t n, T* m, ThreadPool* pool) {
  ParallelRows(pool, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) m[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
  });
}

template <typename T>
void SwiGluBackward(const T* dm, const T* g, const T* u, int64_t n, T* dg, T* du,
                    ThreadPool* pool) {
  ParallelRows(pool, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T s = Sigmoid(g[i]);
      const T silu = g[i] * s;
      du[i] = dm[i] * silu;
      dg[i] = dm[i] * u[i] * (s * (T(1) + g[i] * (T(1) - s)));
    }
  });
}

// ---- Cross-entropy ----
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
