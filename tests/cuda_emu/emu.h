// The CPU emulator of the CUDA programming model (tests/cuda_emu/README.md): what kernels
// compiled by the host compiler (kernel_shim.h) call into. The CUDA runtime and cuBLAS entry
// points the project uses are defined in runtime.cc and cublas.cc against CUDA's own headers.
#ifndef LUMEN_TESTS_CUDA_EMU_EMU_H_
#define LUMEN_TESTS_CUDA_EMU_EMU_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>

namespace cuda_emu {

struct BlockInfo {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running kernel thread's coordinates (valid only inside a kernel).
const uint3& CurrentThreadIdx();
const BlockInfo& CurrentBlock();
// The block's dynamic shared memory (the launch's smem bytes, NaN-filled at block start).
unsigned char* DynamicShared();

// Barriers over the block's live threads and over the calling thread's warp; a barrier that
// can never complete aborts the process, naming the kernel.
void SyncThreads();
void SyncWarp(unsigned mask);
// The value `bits` of lane (own lane ^ lane_mask) of the calling warp; every lane of `mask`
// (the full warp) must call it.
uint64_t ShuffleXor(unsigned mask, uint64_t bits, int lane_mask, int width);

float AtomicAdd(float* address, float v);
double AtomicAdd(double* address, double v);

// Checks the launch configuration like CUDA (the error goes to cudaGetLastError) and queues
// `body` to run once per thread of every block on `stream`.
void EnqueueKernel(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, std::function<void()> body);

// Queues `fn` on `stream` (what cuBLAS's fake runs a product with).
cudaError_t EnqueueHostWork(cudaStream_t stream, std::function<void()> fn);

// Whether [p, p + bytes) lies inside one device allocation.
bool IsDeviceRange(const void* p, size_t bytes);

}  // namespace cuda_emu

#endif  // LUMEN_TESTS_CUDA_EMU_EMU_H_
