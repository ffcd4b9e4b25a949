// Kernels that exercise the CPU emulator itself (emu_test.cc); emu_test_kernels.cu goes
// through cu_to_cc.sh like the project's kernels. Each wrapper launches on `stream` and
// returns cudaGetLastError().
#ifndef LUMEN_TESTS_CUDA_EMU_EMU_TEST_KERNELS_H_
#define LUMEN_TESTS_CUDA_EMU_EMU_TEST_KERNELS_H_

#include <cuda_runtime_api.h>

namespace cuda_emu_test {

// out[b] = sum of x[b * threads .. (b + 1) * threads) by a shared-memory tree and a final
// warp shuffle; `threads` a power of two >= 64.
cudaError_t BlockSums(const float* x, int blocks, int threads, float* out, cudaStream_t stream);
// The same with the barrier between the tree's steps left out (a wrong result, not a hang).
cudaError_t BlockSumsMissingBarrier(const float* x, int blocks, int threads, float* out,
                                    cudaStream_t stream);
// Thread 0 waits at __syncthreads while its warp waits at __syncwarp: can never complete.
cudaError_t MismatchedBarriers(cudaStream_t stream);
// Lane 1 exits before the others shuffle with it.
cudaError_t ShuffleWithExitedLane(float* out, cudaStream_t stream);
// out[0] = the first float of `smem` bytes of dynamic shared memory, as the block finds it.
cudaError_t ReadDynamicShared(int smem, float* out, cudaStream_t stream);
// Allows ReadDynamicShared `smem` bytes (cudaFuncAttributeMaxDynamicSharedMemorySize).
cudaError_t AllowDynamicShared(int smem);

}  // namespace cuda_emu_test

#endif  // LUMEN_TESTS_CUDA_EMU_EMU_TEST_KERNELS_H_
