// One CUDA device as the worker sees it: a byte budget over device allocations (a cap below
// physical memory emulates a smaller card), a compute stream and two copy streams, events,
// pinned host staging and the cuBLASLt GEMM engine. Thread-safe for allocation and the
// accessors; work on a stream is ordered by the caller.
#ifndef LUMEN_WORKER_CUDA_DEVICE_H_
#define LUMEN_WORKER_CUDA_DEVICE_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace lumen::cuda {

class CudaDevice;
class Gemm;

// Number of CUDA devices usable by this process; 0 (not an error) when there is no driver or
// no device. `why` (optional) receives the reason when 0.
int DeviceCount(std::string* why = nullptr);

// A device allocation counted against its CudaDevice's budget; freed when destroyed. Movable.
// Must not outlive its device.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }
  void Reset();

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  friend class CudaDevice;
  CudaDevice* owner_ = nullptr;
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Page-locked host memory (cudaHostAlloc); not counted against the device budget. Movable.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(PinnedBuffer&& o) noexcept { *this = std::move(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { Reset(); }
  void Reset();

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  friend class CudaDevice;
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// A CUDA event without timing. Movable.
class Event {
 public:
  // Without timing (the cheap kind, for ordering streams), or with it (for ElapsedSeconds).
  static absl::StatusOr<Event> Create(const std::string& op);
  static absl::StatusOr<Event> CreateTimed(const std::string& op);
  // Seconds between two completed Records of timed events.
  static absl::StatusOr<double> ElapsedSeconds(const Event& start, const Event& end,
                                               const std::string& op);
  Event() = default;
  Event(Event&& o) noexcept : ev_(o.ev_) { o.ev_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();

  absl::Status Record(cudaStream_t stream, const std::string& op);
  // Makes `stream` wait for the last Record (device-side; the host does not block).
  absl::Status StreamWait(cudaStream_t stream, const std::string& op);
  absl::Status Synchronize(const std::string& op);
  cudaEvent_t get() const { return ev_; }

 private:
  cudaEvent_t ev_ = nullptr;
};

struct CudaDeviceOptions {
  int device_index = 0;
  // Bytes the device allocator may hand out at once. 0: the free memory at creation minus
  // reserve_bytes. A smaller cap emulates a smaller card (allocations past it fail with
  // RESOURCE_EXHAUSTED even when the card has room).
  int64_t budget_bytes = 0;
  // Left to the CUDA context, cuBLAS and fragmentation when budget_bytes is 0.
  int64_t reserve_bytes = int64_t{1} << 30;
  // cuBLASLt workspace (inside the budget): larger lets it pick split-K kernels.
  int64_t gemm_workspace_bytes = int64_t{32} << 20;
};

class CudaDevice {
 public:
  // UNAVAILABLE without a usable device; errors of the CUDA calls otherwise.
  static absl::StatusOr<std::unique_ptr<CudaDevice>> Create(const CudaDeviceOptions& options);
  ~CudaDevice();
  CudaDevice(const CudaDevice&) = delete;
  CudaDevice& operator=(const CudaDevice&) = delete;

  // Reserves and allocates `bytes` (rounded up to 256) for `op`. RESOURCE_EXHAUSTED
  // "<op> needs N bytes; device budget B, in use U" when over the budget, or when cudaMalloc
  // fails; nothing is held then.
  absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes, const std::string& op);
  absl::StatusOr<PinnedBuffer> AllocatePinned(int64_t bytes, const std::string& op);

  cudaStream_t compute_stream() const { return compute_; }
  cudaStream_t h2d_stream() const { return h2d_; }
  cudaStream_t d2h_stream() const { return d2h_; }
  Gemm& gemm() const { return *gemm_; }

  absl::Status SynchronizeAll(const std::string& op);
  // Makes this the calling thread's current CUDA device (the runtime's current device is per
  // thread): entry points that may run on another thread than Create's call it first.
  absl::Status MakeCurrent(const std::string& op) const;

  int device_index() const { return index_; }
  const std::string& name() const { return name_; }
  int sm_count() const { return sm_count_; }
  int compute_capability() const { return cc_; }
  int64_t total_memory() const { return total_memory_; }
  int64_t budget() const { return budget_; }
  int64_t in_use() const;
  int64_t peak() const;
  void ResetPeak();

 private:
  friend class DeviceBuffer;
  CudaDevice() = default;
  void Free(void* ptr, int64_t bytes);

  // Constant after construction.
  int index_ = 0;
  std::string name_;
  int sm_count_ = 0;
  int cc_ = 0;
  int64_t total_memory_ = 0;
  int64_t budget_ = 0;
  cudaStream_t compute_ = nullptr, h2d_ = nullptr, d2h_ = nullptr;
  DeviceBuffer gemm_workspace_;
  std::unique_ptr<Gemm> gemm_;

  mutable absl::Mutex mu_;
  int64_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t peak_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace lumen::cuda

#endif  // LUMEN_WORKER_CUDA_DEVICE_H_
