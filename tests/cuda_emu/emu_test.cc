// The emulator's own checks (README.md): each thing it claims to catch is caught, and what
// it claims to run right runs right.
#include "tests/cuda_emu/emu.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/cuda_emu/emu_test_kernels.h"

namespace cuda_emu_test {
namespace {

class EmuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override { cudaStreamDestroy(s_); }

  template <typename T>
  T* Device(const std::vector<T>& v) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, v.size() * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> Host(const T* p, size_t n) {
    EXPECT_EQ(cudaStreamSynchronize(s_), cudaSuccess);
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }

  cudaStream_t s_ = nullptr;
};

TEST_F(EmuTest, BarriersAndShufflesGiveTheBlockSum) {
  const int blocks = 3, threads = 256;
  std::vector<float> x(blocks * threads);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 2.0f;
  float* dx = Device(x);
  float* out = Device(std::vector<float>(blocks, 0.0f));
  ASSERT_EQ(BlockSums(dx, blocks, threads, out, s_), cudaSuccess);
  const std::vector<float> got = Host(out, blocks);
  for (int b = 0; b < blocks; ++b) {
    double want = 0;
    for (int t = 0; t < threads; ++t) want += x[b * threads + t];
    EXPECT_FLOAT_EQ(got[b], static_cast<float>(want)) << "block " << b;
  }
  // Without the barriers between the tree's steps the threads see each other's partial sums
  // too early, as they could on a GPU.
  ASSERT_EQ(BlockSumsMissingBarrier(dx, blocks, threads, out, s_), cudaSuccess);
  const std::vector<float> racy = Host(out, blocks);
  double want0 = 0;
  for (int t = 0; t < threads; ++t) want0 += x[t];
  EXPECT_NE(racy[0], static_cast<float>(want0));
  cudaFree(dx);
  cudaFree(out);
}

// The stream threads exist: death tests re-execute the binary rather than fork it.
TEST_F(EmuTest, ABarrierThatCannotCompleteAbortsNamingTheKernel) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        MismatchedBarriers(s_);
        cudaStreamSynchronize(s_);
      },
      "MismatchedBarrierKernel.*barrier never completes: 1 threads at __syncthreads, 31 at a "
      "warp barrier");
}

TEST_F(EmuTest, AShuffleWithAnExitedLaneAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  float* out = Device(std::vector<float>(1, 0.0f));
  EXPECT_DEATH(
      {
        ShuffleWithExitedLane(out, s_);
        cudaStreamSynchronize(s_);
      },
      "ExitedLaneKernel.*exited");
  cudaFree(out);
}

TEST_F(EmuTest, DynamicSharedMemoryNeedsTheOptInAndStartsAsNaN) {
  float* out = Device(std::vector<float>(1, 0.0f));
  ASSERT_EQ(ReadDynamicShared(48 << 10, out, s_), cudaSuccess);
  EXPECT_TRUE(std::isnan(Host(out, 1)[0]));
  EXPECT_EQ(ReadDynamicShared(64 << 10, out, s_), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);                       // read once, then cleared
  EXPECT_EQ(AllowDynamicShared(300 << 10), cudaErrorInvalidValue);  // above an H100's 227 KiB
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);  // a failed call is the last error too
  ASSERT_EQ(AllowDynamicShared(64 << 10), cudaSuccess);
  EXPECT_EQ(ReadDynamicShared(64 << 10, out, s_), cudaSuccess);
  cudaFree(out);
}

TEST_F(EmuTest, CopiesAreCheckedAgainstTheirDirectionAndTheAllocation) {
  float* d = Device(std::vector<float>(16, 1.0f));
  std::vector<float> h(32, 0.0f);
  EXPECT_EQ(cudaMemcpyAsync(d, h.data(), 16 * sizeof(float), cudaMemcpyHostToDevice, s_),
            cudaSuccess);
  // Past the end of the 16-float allocation.
  EXPECT_EQ(cudaMemcpyAsync(d, h.data(), 17 * sizeof(float), cudaMemcpyHostToDevice, s_),
            cudaErrorInvalidValue);
  // The direction says host, the pointer is device memory (and the reverse).
  EXPECT_EQ(cudaMemcpyAsync(h.data(), d, 4, cudaMemcpyHostToDevice, s_), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpyAsync(d, h.data(), 4, cudaMemcpyDeviceToHost, s_), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemsetAsync(h.data(), 0, 4, s_), cudaErrorInvalidValue);
  EXPECT_EQ(cudaStreamSynchronize(s_), cudaSuccess);
  cudaFree(d);
}

TEST_F(EmuTest, NewDeviceMemoryIsNaNNotZero) {
  void* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 64), cudaSuccess);
  EXPECT_TRUE(std::isnan(Host(static_cast<float*>(p), 1)[0]));
  cudaFree(p);
}

TEST_F(EmuTest, APageableSourceIsStagedAtTheCall) {
  float* d = Device(std::vector<float>(4, 0.0f));
  std::vector<float> h = {1, 2, 3, 4};
  ASSERT_EQ(cudaMemcpyAsync(d, h.data(), 16, cudaMemcpyHostToDevice, s_), cudaSuccess);
  std::fill(h.begin(), h.end(), 9.0f);  // allowed once the call returns
  EXPECT_EQ(Host(d, 4), (std::vector<float>{1, 2, 3, 4}));
  cudaFree(d);
}

TEST_F(EmuTest, StreamsRunConcurrentlyAndEventsOrderThem) {
  cudaStream_t other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  cudaEvent_t start = nullptr, done = nullptr;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&done), cudaSuccess);
  int* flag = Device(std::vector<int>(1, 0));
  // Pinned both ways: a pageable source would wait for s_ at the call (CUDA's rule), and s_
  // waits for this thread.
  int* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), 2 * sizeof(int), 0), cudaSuccess);
  pinned[0] = -1;
  pinned[1] = 1;
  // s_: start, work that waits for `go` and then 50 ms, flag = 1, done. `other` copies the
  // flag once `done` is reached.
  std::promise<void> go;
  std::shared_future<void> started = go.get_future().share();
  ASSERT_EQ(cudaEventRecord(start, s_), cudaSuccess);
  ASSERT_EQ(cuda_emu::EnqueueHostWork(s_,
                                      [started] {
                                        started.wait();
                                        std::this_thread::sleep_for(std::chrono::milliseconds(50));
                                      }),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(flag, pinned + 1, sizeof(int), cudaMemcpyHostToDevice, s_),
            cudaSuccess);
  ASSERT_EQ(cudaEventRecord(done, s_), cudaSuccess);
  float ms = 0;
  EXPECT_EQ(cudaEventElapsedTime(&ms, start, done), cudaErrorNotReady);
  EXPECT_EQ(cudaGetLastError(), cudaErrorNotReady);
  ASSERT_EQ(cudaStreamWaitEvent(other, done, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned, flag, sizeof(int), cudaMemcpyDeviceToHost, other), cudaSuccess);
  // A pinned destination is written by the stream, not by the call.
  EXPECT_EQ(cudaEventQuery(done), cudaErrorNotReady);
  EXPECT_EQ(pinned[0], -1);
  go.set_value();
  ASSERT_EQ(cudaStreamSynchronize(other), cudaSuccess);
  EXPECT_EQ(pinned[0], 1);
  EXPECT_EQ(cudaEventQuery(done), cudaSuccess);
  ASSERT_EQ(cudaEventElapsedTime(&ms, start, done), cudaSuccess);
  EXPECT_GE(ms, 45.0f);
  // Events made without timing cannot be timed.
  cudaEvent_t untimed = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&untimed, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(untimed, s_), cudaSuccess);
  ASSERT_EQ(cudaEventSynchronize(untimed), cudaSuccess);
  EXPECT_EQ(cudaEventElapsedTime(&ms, start, untimed), cudaErrorInvalidResourceHandle);
  cudaGetLastError();
  cudaEventDestroy(start);
  cudaEventDestroy(done);
  cudaEventDestroy(untimed);
  cudaFreeHost(pinned);
  cudaFree(flag);
  cudaStreamDestroy(other);
}

TEST_F(EmuTest, DeviceMemoryIsBoundedByTheSetting) {
  size_t free_bytes = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, total + 1), cudaErrorMemoryAllocation);
  EXPECT_EQ(cudaGetLastError(), cudaErrorMemoryAllocation);
}

std::vector<uint16_t> Bf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const __nv_bfloat16 b = __float2bfloat16(v[i]);
    std::memcpy(&out[i], &b, 2);
  }
  return out;
}

// Column-major D[m x n] = op(A) op(B) through cuBLASLt with A stored transposed ([k x m]) and
// B not ([k x n]), against the same sums in double.
TEST_F(EmuTest, CublasLtFollowsTheColumnMajorContractAndChecksLayouts) {
  const int m = 3, n = 4, k = 5;
  std::vector<float> a(k * m), b(k * n);
  for (int i = 0; i < k * m; ++i) a[i] = static_cast<float>(i % 5) * 0.5f - 1.0f;
  for (int i = 0; i < k * n; ++i) b[i] = static_cast<float>(i % 3) - 1.0f;
  uint16_t* da = Device(Bf16Bits(a));
  uint16_t* db = Device(Bf16Bits(b));
  float* dd = Device(std::vector<float>(m * n, 0.0f));
  cublasLtHandle_t lt = nullptr;
  ASSERT_EQ(cublasLtCreate(&lt), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulDesc_t desc = nullptr;
  ASSERT_EQ(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  const cublasOperation_t t = CUBLAS_OP_T;
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)),
            CUBLAS_STATUS_SUCCESS);
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr, bad = nullptr;
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, m, k), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, k), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, m, n, m), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&bad, CUDA_R_32F, n, m, n), CUBLAS_STATUS_SUCCESS);
  const float alpha = 1.0f, beta = 0.0f;
  ASSERT_EQ(cublasLtMatmul(lt, desc, &alpha, da, la, db, lb, &beta, dd, ld, dd, ld, nullptr,
                           nullptr, 0, s_),
            CUBLAS_STATUS_SUCCESS);
  const std::vector<float> got = Host(dd, m * n);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double want = 0;
      for (int p = 0; p < k; ++p) {
        want += static_cast<double>(a[i * k + p]) * b[j * k + p];  // A(p,i) and B(p,j)
      }
      EXPECT_NEAR(got[j * m + i], want, 1e-5) << i << "," << j;
    }
  }
  // D given as n x m: the layouts disagree.
  EXPECT_EQ(cublasLtMatmul(lt, desc, &alpha, da, la, db, lb, &beta, dd, bad, dd, bad, nullptr,
                           nullptr, 0, s_),
            CUBLAS_STATUS_INVALID_VALUE);
  // An operand outside device memory.
  std::vector<uint16_t> host_a = Bf16Bits(a);
  EXPECT_EQ(cublasLtMatmul(lt, desc, &alpha, host_a.data(), la, db, lb, &beta, dd, ld, dd, ld,
                           nullptr, nullptr, 0, s_),
            CUBLAS_STATUS_INVALID_VALUE);
  for (cublasLtMatrixLayout_t l : {la, lb, ld, bad}) cublasLtMatrixLayoutDestroy(l);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dd);
}

}  // namespace
}  // namespace cuda_emu_test
