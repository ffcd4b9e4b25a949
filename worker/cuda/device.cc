#include "worker/cuda/device.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/cuda/cuda_status.h"
#include "worker/cuda/gemm.h"

namespace lumen::cuda {
namespace {

std::string Bytes(int64_t b) {
  return absl::StrFormat("%.2f MiB (%d bytes)", static_cast<double>(b) / (1 << 20), b);
}

}  // namespace

int DeviceCount(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why != nullptr) {
      *why = absl::StrCat("cudaGetDeviceCount: ", cudaGetErrorName(err), " (",
                          cudaGetErrorString(err), ")");
    }
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (count == 0 && why != nullptr) *why = "cudaGetDeviceCount reports 0 devices";
  return count;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (owner_ != nullptr) owner_->Free(ptr_, bytes_);
  owner_ = nullptr;
  ptr_ = nullptr;
  bytes_ = 0;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void PinnedBuffer::Reset() {
  if (ptr_ != nullptr) cudaFreeHost(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<Event> Event::Create(const std::string& op) {
  Event e;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e.ev_, cudaEventDisableTiming), op);
  return e;
}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (ev_ != nullptr) cudaEventDestroy(ev_);
    ev_ = std::exchange(o.ev_, nullptr);
  }
  return *this;
}

Event::~Event() {
  if (ev_ != nullptr) cudaEventDestroy(ev_);
}

absl::Status Event::Record(cudaStream_t stream, const std::string& op) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(ev_, stream), op);
  return absl::OkStatus();
}

absl::Status Event::StreamWait(cudaStream_t stream, const std::string& op) {
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, ev_, 0), op);
  return absl::OkStatus();
}

absl::Status Event::Synchronize(const std::string& op) {
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ev_), op);
  return absl::OkStatus();
}

absl::StatusOr<Event> Event::CreateTimed(const std::string& op) {
  Event e;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&e.ev_), op);
  return e;
}

absl::StatusOr<double> Event::ElapsedSeconds(const Event& start, const Event& end,
                                             const std::string& op) {
  float ms = 0;
  CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.ev_, end.ev_), op);
  return ms / 1e3;
}

absl::StatusOr<std::unique_ptr<CudaDevice>> CudaDevice::Create(const CudaDeviceOptions& options) {
  std::string why;
  const int count = DeviceCount(&why);
  if (count == 0) return absl::UnavailableError(absl::StrCat("no CUDA device: ", why));
  if (options.device_index < 0 || options.device_index >= count) {
    return absl::InvalidArgumentError(absl::StrCat("device_index ", options.device_index,
                                                   " outside [0, ", count, ")"));
  }
  std::unique_ptr<CudaDevice> dev(new CudaDevice());
  dev->index_ = options.device_index;
  const std::string op = absl::StrCat("open CUDA device ", options.device_index);
  CUDA_RETURN_IF_ERROR(cudaSetDevice(dev->index_), op);
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, dev->index_), op);
  dev->name_ = prop.name;
  dev->sm_count_ = prop.multiProcessorCount;
  dev->cc_ = prop.major * 10 + prop.minor;
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), op);
  dev->total_memory_ = static_cast<int64_t>(total_bytes);
  const int64_t usable = static_cast<int64_t>(free_bytes) - options.reserve_bytes;
  dev->budget_ = options.budget_bytes > 0 ? options.budget_bytes : usable;
  if (dev->budget_ <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat(op, ": free memory ", Bytes(free_bytes),
                                                     " is below the reserve ",
                                                     Bytes(options.reserve_bytes)));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->compute_, cudaStreamNonBlocking), op);
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->h2d_, cudaStreamNonBlocking), op);
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->d2h_, cudaStreamNonBlocking), op);
  auto ws = dev->Allocate(options.gemm_workspace_bytes, "cuBLASLt workspace");
  if (!ws.ok()) return ws.status();
  dev->gemm_workspace_ = std::move(ws).value();
  auto gemm = Gemm::Create(dev->gemm_workspace_.get(), dev->gemm_workspace_.bytes());
  if (!gemm.ok()) return gemm.status();
  dev->gemm_ = std::move(gemm).value();
  return dev;
}

CudaDevice::~CudaDevice() {
  if (compute_ != nullptr) cudaStreamSynchronize(compute_);
  gemm_.reset();
  gemm_workspace_.Reset();
  for (cudaStream_t s : {compute_, h2d_, d2h_}) {
    if (s != nullptr) cudaStreamDestroy(s);
  }
}

absl::Status CudaDevice::MakeCurrent(const std::string& op) const {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(index_), op);
  return absl::OkStatus();
}

absl::StatusOr<DeviceBuffer> CudaDevice::Allocate(int64_t bytes, const std::string& op) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat(op, ": negative size ", bytes));
  if (absl::Status s = MakeCurrent(op); !s.ok()) return s;
  const int64_t rounded = (bytes + 255) / 256 * 256;
  {
    absl::MutexLock lock(&mu_);
    if (in_use_ + rounded > budget_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          op, " needs ", Bytes(rounded), " more; device budget ", Bytes(budget_), ", in use ",
          Bytes(in_use_)));
    }
    in_use_ += rounded;
    if (in_use_ > peak_) peak_ = in_use_;
  }
  DeviceBuffer buf;
  if (rounded == 0) return buf;
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, static_cast<size_t>(rounded));
  if (err != cudaSuccess) {
    cudaGetLastError();
    {
      absl::MutexLock lock(&mu_);
      in_use_ -= rounded;
    }
    return absl::ResourceExhaustedError(absl::StrCat(op, ": cudaMalloc of ", Bytes(rounded),
                                                     " failed: ", cudaGetErrorString(err),
                                                     " (budget ", Bytes(budget_), ")"));
  }
  buf.owner_ = this;
  buf.ptr_ = ptr;
  buf.bytes_ = rounded;
  return buf;
}

void CudaDevice::Free(void* ptr, int64_t bytes) {
  if (ptr != nullptr) cudaFree(ptr);
  absl::MutexLock lock(&mu_);
  in_use_ -= bytes;
}

absl::StatusOr<PinnedBuffer> CudaDevice::AllocatePinned(int64_t bytes, const std::string& op) {
  PinnedBuffer buf;
  if (bytes <= 0) return buf;
  CUDA_RETURN_IF_ERROR(cudaHostAlloc(&buf.ptr_, static_cast<size_t>(bytes), cudaHostAllocDefault),
                       absl::StrCat(op, " (pinned host ", Bytes(bytes), ")"));
  buf.bytes_ = bytes;
  return buf;
}

absl::Status CudaDevice::SynchronizeAll(const std::string& op) {
  for (cudaStream_t s : {compute_, h2d_, d2h_}) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s), op);
  }
  return absl::OkStatus();
}

int64_t CudaDevice::in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

int64_t CudaDevice::peak() const {
  absl::MutexLock lock(&mu_);
  return peak_;
}

void CudaDevice::ResetPeak() {
  absl::MutexLock lock(&mu_);
  peak_ = in_use_;
}

}  // namespace lumen::cuda
