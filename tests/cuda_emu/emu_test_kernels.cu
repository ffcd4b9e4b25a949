#include "tests/cuda_emu/emu_test_kernels.h"

namespace cuda_emu_test {
namespace {

template <bool kBarrier>
__global__ void BlockSumKernel(const float* x, float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int half = blockDim.x / 2; half >= 32; half /= 2) {
    if (t < half) s[t] += s[t + half];
    if (kBarrier) __syncthreads();
  }
  if (t < 32) {
    float v = s[t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (t == 0) out[blockIdx.x] = v;
  }
}

__global__ void MismatchedBarrierKernel() {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

__global__ void ExitedLaneKernel(float* out) {
  if (threadIdx.x == 1) return;
  const float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  if (threadIdx.x == 0) out[0] = v;
}

__global__ void ReadDynamicSharedKernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (threadIdx.x == 0) out[0] = reinterpret_cast<const float*>(smem)[0];
}

}  // namespace

cudaError_t BlockSums(const float* x, int blocks, int threads, float* out, cudaStream_t stream) {
  BlockSumKernel<true><<<blocks, threads, threads * sizeof(float), stream>>>(x, out);
  return cudaGetLastError();
}

cudaError_t BlockSumsMissingBarrier(const float* x, int blocks, int threads, float* out,
                                    cudaStream_t stream) {
  BlockSumKernel<false><<<blocks, threads, threads * sizeof(float), stream>>>(x, out);
  return cudaGetLastError();
}

cudaError_t MismatchedBarriers(cudaStream_t stream) {
  MismatchedBarrierKernel<<<1, 32, 0, stream>>>();
  return cudaGetLastError();
}

cudaError_t ShuffleWithExitedLane(float* out, cudaStream_t stream) {
  ExitedLaneKernel<<<1, 32, 0, stream>>>(out);
  return cudaGetLastError();
}

cudaError_t ReadDynamicShared(int smem, float* out, cudaStream_t stream) {
  ReadDynamicSharedKernel<<<1, 32, smem, stream>>>(out);
  return cudaGetLastError();
}

cudaError_t AllowDynamicShared(int smem) {
  return cudaFuncSetAttribute(ReadDynamicSharedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              smem);
}

}  // namespace cuda_emu_test
