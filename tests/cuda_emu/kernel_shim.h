// What a .cu file needs to compile as plain C++ and run on the CPU emulator
// (tests/cuda_emu/README.md). cu_to_cc.sh force-includes this header into each rewritten
// source: the thread and block coordinates, barriers, warp shuffles, atomics, the device math
// functions the kernels use, `nvcuda::wmma` 16x16x16 fragments, and the launcher that
// replaces `kernel<<<grid, block, smem, stream>>>(args)`.
//
// Semantics kept from CUDA: a block's threads run as cooperative fibers, so __syncthreads and
// __syncwarp are real barriers (a barrier some thread never reaches aborts with the kernel's
// name instead of hanging); __shared__ variables are shared by the block's threads and
// dynamic shared memory starts as NaN bytes; a launch runs on its stream's thread, after the
// stream's earlier work. Not kept: speed, warp-synchronous code without __syncwarp (threads
// of a warp do not run in lockstep here), and floating-point rounding of fast-math
// intrinsics (__expf is expf).
#ifndef LUMEN_TESTS_CUDA_EMU_KERNEL_SHIM_H_
#define LUMEN_TESTS_CUDA_EMU_KERNEL_SHIM_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>  // what nvcc includes into every .cu (the C++ API's templates)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "tests/cuda_emu/emu.h"

// CUDA's host_defines.h leaves these empty for a host compiler; shared memory must be one
// copy per block (blocks of a launch run one after another on the stream's thread).
#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#define threadIdx (::cuda_emu::CurrentThreadIdx())
#define blockIdx (::cuda_emu::CurrentBlock().block_idx)
#define blockDim (::cuda_emu::CurrentBlock().block_dim)
#define gridDim (::cuda_emu::CurrentBlock().grid_dim)

inline void __syncthreads() { ::cuda_emu::SyncThreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::SyncWarp(mask); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t got = ::cuda_emu::ShuffleXor(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// The C++ API's overload for a kernel (cuda_runtime.h declares it only for nvcc).
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline float atomicAdd(float* address, float v) { return ::cuda_emu::AtomicAdd(address, v); }
inline double atomicAdd(double* address, double v) { return ::cuda_emu::AtomicAdd(address, v); }

// Device math without fused multiply-adds (the emulator's build does not contract).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float cospif(float a) {
  return static_cast<float>(std::cos(3.14159265358979323846 * static_cast<double>(a)));
}

namespace nvcuda {
namespace wmma {

// Fragments hold the whole 16x16 tile in every thread (the hardware spreads it over the
// warp): element-wise code that treats every element alike behaves the same; code that
// relies on which lane holds which element does not (the project has none).
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 16 * 16;
  T x[num_elements];  // x[r * 16 + c]: row r, column c of the tile as the op sees it
};

template <typename T>
inline float ToFloat(T v) {
  return static_cast<float>(v);
}
template <>
inline float ToFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  ::cuda_emu::SyncWarp(0xffffffffu);
  constexpr bool kCol = std::is_same<Layout, col_major>::value;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = kCol ? p[c * ld + r] : p[r * ld + c];
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  ::cuda_emu::SyncWarp(0xffffffffu);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[r * 16 + c] = layout == mem_col_major ? p[c * ld + r] : p[r * ld + c];
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  ::cuda_emu::SyncWarp(0xffffffffu);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_col_major ? p[c * ld + r] : p[r * ld + c]) = f.x[r * 16 + c];
    }
  }
}

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (T& e : f.x) e = v;
}

// d = a * b + c with fp32 products and sums (in k order).
template <typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  ::cuda_emu::SyncWarp(0xffffffffu);
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float acc = c.x[r * 16 + col];
      for (int k = 0; k < 16; ++k) {
        acc += ToFloat(a.x[r * 16 + k]) * ToFloat(b.x[k * 16 + col]);
      }
      out[r * 16 + col] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

namespace cuda_emu {

// `Launch("name", kernel, grid, block, smem, stream)(args...)`: what cu_to_cc.sh turns a triple-
// chevron launch into. The arguments are converted to the kernel's parameter types and copied
// (as CUDA copies them at launch); the kernel runs on the stream's thread.
template <typename... P>
class Launch {
 public:
  Launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
         cudaStream_t stream = 0)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), smem_(smem), stream_(stream) {}

  template <typename... A>
  void operator()(A&&... args) const {
    auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
    void (*kernel)(P...) = kernel_;
    EnqueueKernel(name_, reinterpret_cast<const void*>(kernel_), grid_, block_, smem_, stream_,
                  [kernel, params] { std::apply(kernel, *params); });
  }

 private:
  const char* name_;
  void (*kernel_)(P...);
  dim3 grid_, block_;
  size_t smem_;
  cudaStream_t stream_;
};

}  // namespace cuda_emu

#endif  // LUMEN_TESTS_CUDA_EMU_KERNEL_SHIM_H_
