// The CUDA runtime on the CPU (tests/cuda_emu/README.md): device memory is host memory that
// the emulator tracks, every stream is a thread that runs its work in order, events are
// tickets on those threads, and a kernel's blocks run one after another on the stream's thread
// with one fiber per CUDA thread (x86-64). Every entry point the project calls is here, with
// CUDA's signature (from CUDA's headers) and CUDA's documented checks: copies whose pointers
// do not match their direction or run past a device allocation, bad launch configurations and
// shared memory beyond the opt-in all fail as they would on a GPU. What no GPU would say is printed
// to stderr with "cuda_emu:" before the error is returned.
#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tests/cuda_emu/emu.h"

namespace cuda_emu {
namespace {

constexpr size_t kDefaultSmem = 48 << 10;
constexpr int kMaxSmemOptin = 232448;  // an H100's 227 KiB
constexpr int kSmCount = 4;

// ---- Errors (per host thread, like CUDA's) ----
thread_local cudaError_t t_last_error = cudaSuccess;

cudaError_t Fail(cudaError_t err, const std::string& why) {
  std::fprintf(stderr, "cuda_emu: %s\n", why.c_str());
  t_last_error = err;
  return err;
}

// ---- Memory ----
struct Allocation {
  size_t bytes;
  bool device;
};

std::mutex g_mem_mu;
std::map<uintptr_t, Allocation> g_allocs;  // by start address
size_t g_device_used = 0;

size_t TotalDeviceMemory() {
  static const size_t total = [] {
    const char* v = std::getenv("LUMEN_CUDA_EMU_MEMORY_MB");
    const long mb = v != nullptr ? std::atol(v) : 0;
    return static_cast<size_t>(mb > 0 ? mb : 4096) << 20;
  }();
  return total;
}

int DeviceCountSetting() {
  const char* v = std::getenv("LUMEN_CUDA_EMU_DEVICES");
  const int n = v != nullptr ? std::atoi(v) : 1;
  return n < 0 ? 0 : n;
}

// The allocation holding [p, p + bytes), or null.
const Allocation* Find(const void* p, size_t bytes, uintptr_t* start) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  if (a + bytes > it->first + it->second.bytes) return nullptr;
  if (start != nullptr) *start = it->first;
  return &it->second;
}

enum class Where { kDevice, kPinned, kPageable, kBadDevice };

// kBadDevice: starts inside a device allocation but runs past its end.
Where Classify(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  const Allocation* a = Find(p, bytes, nullptr);
  if (a != nullptr) return a->device ? Where::kDevice : Where::kPinned;
  const Allocation* head = Find(p, 1, nullptr);
  if (head != nullptr && head->device) return Where::kBadDevice;
  return Where::kPageable;
}

// ---- Fibers: one per CUDA thread of the block being run ----
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;

// Saves the callee-saved registers on the current stack, stores its pointer in *save and
// continues on the stack `to` (made by NewContext or saved by an earlier switch). ucontext's
// swapcontext does the same plus a signal-mask system call, which made barriers 50x slower.
extern "C" void cuda_emu_switch(void** save, void* to);
asm(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
)");

// A stack that starts `entry` (which must never return) on the first switch to it.
void* NewContext(char* stack, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) &
                                      ~static_cast<uintptr_t>(15));
  *--sp = nullptr;  // entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  return sp;
}

struct Fiber {
  void* sp = nullptr;
  uint3 tid;
  int linear = 0;
  enum State { kReady, kBlockWait, kWarpWait, kDone } state = kReady;
  uint64_t wait_gen = 0;
  uint64_t shuffles = 0;
};

class BlockRunner {
 public:
  ~BlockRunner() {
    if (stacks_ != nullptr) munmap(stacks_, stack_slots_ * (kStackBytes + kGuardBytes));
  }

  void RunGrid(const std::string& name, dim3 grid, dim3 block, size_t smem,
               const std::function<void()>& body) {
    name_ = &name;
    body_ = &body;
    const int n = static_cast<int>(block.x * block.y * block.z);
    EnsureStacks(n);
    fibers_.resize(n);
    const int warps = (n + 31) / 32;
    warp_live_.assign(warps, 0);
    warp_arrived_.assign(warps, 0);
    warp_gen_.assign(warps, 0);
    smem_.resize(std::max<size_t>(smem, 1));
    info_.block_dim = block;
    info_.grid_dim = grid;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          info_.block_idx = uint3{x, y, z};
          RunBlock(n);
        }
      }
    }
  }

  void SyncThreads() {
    Fiber& f = fibers_[current_];
    f.state = Fiber::kBlockWait;
    f.wait_gen = block_gen_;
    if (++block_arrived_ == live_) ReleaseBlock();
    cuda_emu_switch(&f.sp, sched_);
  }

  void SyncWarp() {
    Fiber& f = fibers_[current_];
    const int w = f.linear / 32;
    f.state = Fiber::kWarpWait;
    f.wait_gen = warp_gen_[w];
    if (++warp_arrived_[w] == warp_live_[w]) ReleaseWarp(w);
    cuda_emu_switch(&f.sp, sched_);
  }

  // One barrier a shuffle: consecutive shuffles use alternate slots, and a lane cannot write
  // a slot again before every lane has passed the next barrier, i.e. has read it. Each slot
  // also holds the writer's shuffle count, so a lane that never took part is caught.
  uint64_t ShuffleXor(uint64_t bits, int lane_mask, int width) {
    Fiber& f = fibers_[current_];
    const int me = f.linear;
    const uint64_t round = ++f.shuffles;
    std::vector<std::pair<uint64_t, uint64_t>>& buf = shuffle_[round & 1];
    buf[me] = {round, bits};
    SyncWarp();
    const int lane = me % 32;
    const int seg = width > 0 ? width : 32;
    const int partner_lane = (lane ^ lane_mask) % 32;
    const int partner = (lane / seg == partner_lane / seg) ? me - lane + partner_lane : me;
    if (partner >= static_cast<int>(fibers_.size()) || buf[partner].first != round) {
      Abort("__shfl_xor_sync reads a lane that has exited or does not exist");
    }
    return buf[partner].second;
  }

  const uint3& thread_idx() const { return fibers_[current_].tid; }
  const BlockInfo& info() const { return info_; }
  unsigned char* smem() { return smem_.data(); }
  bool in_kernel() const { return current_ >= 0; }

 private:
  static void Entry();

  void EnsureStacks(int n) {
    if (n <= stack_slots_) return;
    if (stacks_ != nullptr) munmap(stacks_, stack_slots_ * (kStackBytes + kGuardBytes));
    const size_t slot = kStackBytes + kGuardBytes;
    void* m = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "cuda_emu: cannot map %d fiber stacks\n", n);
      std::abort();
    }
    stacks_ = static_cast<char*>(m);
    stack_slots_ = n;
    for (int i = 0; i < n; ++i) mprotect(stacks_ + i * slot, kGuardBytes, PROT_NONE);
  }

  void RunBlock(int n) {
    std::memset(smem_.data(), 0xff, smem_.size());
    shuffle_[0].assign(n, {0, 0});
    shuffle_[1].assign(n, {0, 0});
    live_ = n;
    block_arrived_ = 0;
    std::fill(warp_arrived_.begin(), warp_arrived_.end(), 0);
    std::fill(warp_live_.begin(), warp_live_.end(), 0);
    const dim3 b = info_.block_dim;
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.linear = i;
      f.tid = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
      f.state = Fiber::kReady;
      f.shuffles = 0;
      ++warp_live_[i / 32];
      // Stack tops staggered within a page, so that the fibers' hot frames do not all fall in
      // the same cache sets.
      f.sp = NewContext(stacks_ + i * (kStackBytes + kGuardBytes) + kGuardBytes,
                        kStackBytes - (i * 64) % 4096, &BlockRunner::Entry);
    }
    while (live_ > 0) {
      bool ran = false;
      for (int i = 0; i < n; ++i) {
        Fiber& f = fibers_[i];
        if (!Runnable(f)) continue;
        f.state = Fiber::kReady;
        current_ = i;
        ran = true;
        cuda_emu_switch(&sched_, f.sp);
        current_ = -1;
      }
      if (!ran && live_ > 0) Deadlock();
    }
  }

  bool Runnable(const Fiber& f) const {
    switch (f.state) {
      case Fiber::kReady:
        return true;
      case Fiber::kBlockWait:
        return f.wait_gen != block_gen_;
      case Fiber::kWarpWait:
        return f.wait_gen != warp_gen_[f.linear / 32];
      case Fiber::kDone:
        return false;
    }
    return false;
  }

  void ReleaseBlock() {
    ++block_gen_;
    block_arrived_ = 0;
  }
  void ReleaseWarp(int w) {
    ++warp_gen_[w];
    warp_arrived_[w] = 0;
  }

  void Finish() {
    Fiber& f = fibers_[current_];
    f.state = Fiber::kDone;
    const int w = f.linear / 32;
    --live_;
    --warp_live_[w];
    if (block_arrived_ > 0 && block_arrived_ == live_) ReleaseBlock();
    if (warp_arrived_[w] > 0 && warp_arrived_[w] == warp_live_[w]) ReleaseWarp(w);
  }

  [[noreturn]] void Abort(const char* what) {
    const uint3 b = info_.block_idx;
    std::fprintf(stderr, "cuda_emu: kernel %s, block (%u,%u,%u), thread %d: %s\n", name_->c_str(),
                 b.x, b.y, b.z, current_ >= 0 ? fibers_[current_].linear : -1, what);
    std::abort();
  }

  [[noreturn]] void Deadlock() {
    int at_block = 0, at_warp = 0;
    for (const Fiber& f : fibers_) {
      at_block += f.state == Fiber::kBlockWait;
      at_warp += f.state == Fiber::kWarpWait;
    }
    const uint3 b = info_.block_idx;
    std::fprintf(stderr,
                 "cuda_emu: kernel %s, block (%u,%u,%u): barrier never completes: %d threads "
                 "at __syncthreads, %d at a warp barrier, %d exited\n",
                 name_->c_str(), b.x, b.y, b.z, at_block, at_warp,
                 static_cast<int>(fibers_.size()) - live_);
    std::abort();
  }

  const std::string* name_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  BlockInfo info_{};
  std::vector<Fiber> fibers_;
  std::vector<std::pair<uint64_t, uint64_t>> shuffle_[2];  // (writer's round, value)
  std::vector<int> warp_live_, warp_arrived_;
  std::vector<uint64_t> warp_gen_;
  std::vector<unsigned char> smem_;
  int live_ = 0, block_arrived_ = 0, current_ = -1;
  uint64_t block_gen_ = 0;
  void* sched_ = nullptr;  // the scheduler's stack while a fiber runs
  char* stacks_ = nullptr;
  int stack_slots_ = 0;
};

thread_local BlockRunner* t_runner = nullptr;

BlockRunner& Runner() {
  if (t_runner == nullptr) t_runner = new BlockRunner();  // one per stream thread, kept
  return *t_runner;
}

void BlockRunner::Entry() {
  BlockRunner& r = *t_runner;
  (*r.body_)();
  r.Finish();
  Fiber& f = r.fibers_[r.current_];
  cuda_emu_switch(&f.sp, r.sched_);  // never resumed
  std::abort();
}

BlockRunner& KernelRunner(const char* call) {
  if (t_runner == nullptr || !t_runner->in_kernel()) {
    std::fprintf(stderr, "cuda_emu: %s called outside a kernel\n", call);
    std::abort();
  }
  return *t_runner;
}

// ---- Streams ----
class Stream {
 public:
  explicit Stream(bool blocking) : blocking_(blocking), th_([this] { Loop(); }) {}
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    th_.join();
  }

  bool blocking() const { return blocking_; }

  uint64_t Enqueue(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(mu_);
    q_.push_back(std::move(fn));
    ++issued_;
    cv_.notify_all();
    return issued_;
  }

  uint64_t issued() {
    std::lock_guard<std::mutex> lock(mu_);
    return issued_;
  }

  void WaitFor(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_ >= ticket; });
  }

  void Synchronize() { WaitFor(issued()); }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      std::function<void()> fn = std::move(q_.front());
      q_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
      ++done_;
      cv_.notify_all();
    }
  }

  const bool blocking_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  uint64_t issued_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread th_;  // last: starts after the members it uses
};

std::mutex g_streams_mu;
std::set<Stream*> g_streams;  // created and not destroyed

Stream* Legacy() {
  static Stream* legacy = new Stream(true);
  return legacy;
}

// Null when `s` is not a stream this emulator made.
Stream* Resolve(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return Legacy();
  Stream* st = reinterpret_cast<Stream*>(s);
  std::lock_guard<std::mutex> lock(g_streams_mu);
  return g_streams.count(st) != 0 ? st : nullptr;
}

std::vector<Stream*> AllStreams() {
  std::lock_guard<std::mutex> lock(g_streams_mu);
  std::vector<Stream*> all(g_streams.begin(), g_streams.end());
  all.push_back(Legacy());
  return all;
}

// Work on the legacy stream waits for every blocking stream's earlier work, and work on a
// blocking stream for the legacy stream's (CUDA's implicit synchronisation).
uint64_t Submit(Stream* s, std::function<void()> fn) {
  std::vector<std::pair<Stream*, uint64_t>> after;
  if (s == Legacy()) {
    for (Stream* o : AllStreams()) {
      if (o != s && o->blocking()) after.emplace_back(o, o->issued());
    }
  } else if (s->blocking()) {
    after.emplace_back(Legacy(), Legacy()->issued());
  }
  if (after.empty()) return s->Enqueue(std::move(fn));
  return s->Enqueue([after, fn = std::move(fn)] {
    for (const auto& [o, ticket] : after) o->WaitFor(ticket);
    fn();
  });
}

void SynchronizeDevice() {
  for (Stream* s : AllStreams()) s->Synchronize();
}

// ---- Events ----
struct EventState {
  bool timing = true;
  uint64_t recorded = 0, completed = 0;
  std::chrono::steady_clock::time_point when;
};

std::mutex g_ev_mu;
std::condition_variable g_ev_cv;
std::set<EventState*> g_events;

EventState* ResolveEvent(cudaEvent_t e) {
  EventState* ev = reinterpret_cast<EventState*>(e);
  return g_events.count(ev) != 0 ? ev : nullptr;  // caller holds g_ev_mu
}

void WaitEvent(EventState* ev, uint64_t ticket) {
  std::unique_lock<std::mutex> lock(g_ev_mu);
  g_ev_cv.wait(lock, [&] { return ev->completed >= ticket; });
}

// ---- Kernels ----
std::mutex g_func_mu;
std::map<const void*, int> g_func_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

template <typename T>
T AtomicAddImpl(T* address, T v) {
  T old, desired;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  do {
    desired = old + v;
  } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
}

}  // namespace

const uint3& CurrentThreadIdx() { return KernelRunner("threadIdx").thread_idx(); }
const BlockInfo& CurrentBlock() { return KernelRunner("blockIdx").info(); }
unsigned char* DynamicShared() { return KernelRunner("extern __shared__").smem(); }
void SyncThreads() { KernelRunner("__syncthreads").SyncThreads(); }
void SyncWarp(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emu: __syncwarp with a partial mask is not emulated\n");
    std::abort();
  }
  KernelRunner("__syncwarp").SyncWarp();
}
uint64_t ShuffleXor(unsigned mask, uint64_t bits, int lane_mask, int width) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emu: __shfl_xor_sync with a partial mask is not emulated\n");
    std::abort();
  }
  return KernelRunner("__shfl_xor_sync").ShuffleXor(bits, lane_mask, width);
}
float AtomicAdd(float* address, float v) { return AtomicAddImpl(address, v); }
double AtomicAdd(double* address, double v) { return AtomicAddImpl(address, v); }

void EnqueueKernel(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, std::function<void()> body) {
  const std::string name = kernel_name;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    Fail(cudaErrorInvalidConfiguration,
         "launch of " + name + ": bad grid (" + std::to_string(grid.x) + "," +
             std::to_string(grid.y) + "," + std::to_string(grid.z) + ") or block (" +
             std::to_string(block.x) + "," + std::to_string(block.y) + "," +
             std::to_string(block.z) + ")");
    return;
  }
  size_t allowed = kDefaultSmem;
  {
    std::lock_guard<std::mutex> lock(g_func_mu);
    auto it = g_func_smem.find(kernel);
    if (it != g_func_smem.end()) allowed = std::max<size_t>(allowed, it->second);
  }
  if (smem > allowed) {
    Fail(cudaErrorInvalidValue, "launch of " + name + " with " + std::to_string(smem) +
                                    " bytes of dynamic shared memory; the kernel allows " +
                                    std::to_string(allowed) +
                                    " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
    return;
  }
  Stream* s = Resolve(stream);
  if (s == nullptr) {
    Fail(cudaErrorInvalidResourceHandle, "launch of " + name + " on an unknown stream");
    return;
  }
  Submit(s, [name, grid, block, smem, body = std::move(body)] {
    Runner().RunGrid(name, grid, block, smem, body);
  });
}

cudaError_t EnqueueHostWork(cudaStream_t stream, std::function<void()> fn) {
  Stream* s = Resolve(stream);
  if (s == nullptr) return Fail(cudaErrorInvalidResourceHandle, "work on an unknown stream");
  Submit(s, std::move(fn));
  return cudaSuccess;
}

bool IsDeviceRange(const void* p, size_t bytes) { return Classify(p, bytes) == Where::kDevice; }

}  // namespace cuda_emu

using cuda_emu::Classify;
using cuda_emu::Fail;
using cuda_emu::Where;

namespace {

thread_local int t_device = 0;

const char* KindName(cudaMemcpyKind kind) {
  switch (kind) {
    case cudaMemcpyHostToHost:
      return "HostToHost";
    case cudaMemcpyHostToDevice:
      return "HostToDevice";
    case cudaMemcpyDeviceToHost:
      return "DeviceToHost";
    case cudaMemcpyDeviceToDevice:
      return "DeviceToDevice";
    default:
      return "Default";
  }
}

// Checks one side of a copy: `device` says whether the kind puts it in device memory.
cudaError_t CheckSide(const void* p, size_t bytes, bool device, const char* side,
                      cudaMemcpyKind kind, const char* call) {
  if (bytes == 0) return cudaSuccess;
  const Where w = Classify(p, bytes);
  if (w == Where::kBadDevice) {
    return Fail(cudaErrorInvalidValue, std::string(call) + ": " + side + " range of " +
                                           std::to_string(bytes) +
                                           " bytes runs past its device allocation");
  }
  if (kind != cudaMemcpyDefault && (w == Where::kDevice) != device) {
    return Fail(cudaErrorInvalidValue,
                std::string(call) + " (" + KindName(kind) + "): " + side +
                    (device ? " is not device memory" : " is device memory"));
  }
  return cudaSuccess;
}

cudaError_t CheckCopy(void* dst, const void* src, size_t dst_span, size_t src_span,
                      cudaMemcpyKind kind, const char* call) {
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (cudaError_t e = CheckSide(dst, dst_span, dst_dev, "destination", kind, call);
      e != cudaSuccess) {
    return e;
  }
  return CheckSide(src, src_span, src_dev, "source", kind, call);
}

}  // namespace

extern "C" {

// CUDA's fast exponential, declared (but not exported) by glibc's math.h.
float __expf(float x) noexcept { return expf(x); }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_emu::t_last_error;
  cuda_emu::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return cuda_emu::t_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    default:
      return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    default:
      return "unknown error (CUDA emulator)";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = cuda_emu::DeviceCountSetting();
  if (*count == 0) return Fail(cudaErrorNoDevice, "LUMEN_CUDA_EMU_DEVICES is 0");
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cuda_emu::DeviceCountSetting()) {
    return Fail(cudaErrorInvalidDevice, "cudaSetDevice(" + std::to_string(device) + ")");
  }
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= cuda_emu::DeviceCountSetting()) {
    return Fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties(" + std::to_string(device) + ")");
  }
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "CUDA emulator (CPU)");
  prop->totalGlobalMem = cuda_emu::TotalDeviceMemory();
  prop->sharedMemPerBlock = cuda_emu::kDefaultSmem;
  prop->sharedMemPerBlockOptin = cuda_emu::kMaxSmemOptin;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->multiProcessorCount = cuda_emu::kSmCount;
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= cuda_emu::DeviceCountSetting()) {
    return Fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: device");
  }
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cuda_emu::kMaxSmemOptin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = cuda_emu::kSmCount;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    default:
      return Fail(cudaErrorInvalidValue,
                  "cudaDeviceGetAttribute: attribute " + std::to_string(attr) + " not emulated");
  }
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
  *total_bytes = cuda_emu::TotalDeviceMemory();
  *free_bytes = *total_bytes - cuda_emu::g_device_used;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  const size_t rounded = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  {
    std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
    if (cuda_emu::g_device_used + rounded > cuda_emu::TotalDeviceMemory()) {
      cuda_emu::t_last_error = cudaErrorMemoryAllocation;
      return cudaErrorMemoryAllocation;
    }
    cuda_emu::g_device_used += rounded;
  }
  void* p = std::aligned_alloc(256, rounded);
  if (p == nullptr) {
    std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
    cuda_emu::g_device_used -= rounded;
    cuda_emu::t_last_error = cudaErrorMemoryAllocation;
    return cudaErrorMemoryAllocation;
  }
  std::memset(p, 0xff, rounded);  // NaN in bf16 and fp32: a read before a write shows
  std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
  cuda_emu::g_allocs[reinterpret_cast<uintptr_t>(p)] = {size, true};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int /*flags*/) {
  const size_t rounded = (std::max<size_t>(size, 1) + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded);
  if (p == nullptr) {
    cuda_emu::t_last_error = cudaErrorMemoryAllocation;
    return cudaErrorMemoryAllocation;
  }
  std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
  cuda_emu::g_allocs[reinterpret_cast<uintptr_t>(p)] = {size, false};
  *ptr = p;
  return cudaSuccess;
}

// Both free only after the device has finished with the memory, as CUDA's do.
static cudaError_t FreeAllocation(void* ptr, bool device, const char* call) {
  if (ptr == nullptr) return cudaSuccess;
  cuda_emu::SynchronizeDevice();
  std::lock_guard<std::mutex> lock(cuda_emu::g_mem_mu);
  auto it = cuda_emu::g_allocs.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == cuda_emu::g_allocs.end() || it->second.device != device) {
    std::fprintf(stderr, "cuda_emu: %s of a pointer it did not allocate\n", call);
    cuda_emu::t_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  if (device) cuda_emu::g_device_used -= (std::max<size_t>(it->second.bytes, 1) + 255) / 256 * 256;
  cuda_emu::g_allocs.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) { return FreeAllocation(ptr, true, "cudaFree"); }
cudaError_t cudaFreeHost(void* ptr) { return FreeAllocation(ptr, false, "cudaFreeHost"); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  auto* s = new cuda_emu::Stream((flags & cudaStreamNonBlocking) == 0);
  std::lock_guard<std::mutex> lock(cuda_emu::g_streams_mu);
  cuda_emu::g_streams.insert(s);
  *stream = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr || s == cuda_emu::Legacy()) {
    return Fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of an unknown stream");
  }
  {
    std::lock_guard<std::mutex> lock(cuda_emu::g_streams_mu);
    cuda_emu::g_streams.erase(s);
  }
  delete s;  // runs what was queued first
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize");
  s->Synchronize();
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  cuda_emu::SynchronizeDevice();
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  auto* ev = new cuda_emu::EventState();
  ev->timing = (flags & cudaEventDisableTiming) == 0;
  std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
  cuda_emu::g_events.insert(ev);
  *event = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
  cuda_emu::EventState* ev = cuda_emu::ResolveEvent(event);
  if (ev == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy");
  // CUDA lets a recorded event be destroyed before it completes; keep its state alive for
  // the stream work that still refers to it (a few bytes an event).
  cuda_emu::g_events.erase(ev);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  uint64_t ticket = 0;
  cuda_emu::EventState* ev = nullptr;
  {
    std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
    ev = cuda_emu::ResolveEvent(event);
    if (ev == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: event");
    ticket = ++ev->recorded;
  }
  const cudaError_t err = cuda_emu::EnqueueHostWork(stream, [ev, ticket] {
    {
      std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
      ev->completed = std::max(ev->completed, ticket);
      ev->when = std::chrono::steady_clock::now();
    }
    cuda_emu::g_ev_cv.notify_all();
  });
  return err;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  uint64_t ticket = 0;
  cuda_emu::EventState* ev = nullptr;
  {
    std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
    ev = cuda_emu::ResolveEvent(event);
    if (ev == nullptr || flags != 0) {
      return Fail(ev == nullptr ? cudaErrorInvalidResourceHandle : cudaErrorInvalidValue,
                  "cudaStreamWaitEvent");
    }
    ticket = ev->recorded;
  }
  if (ticket == 0) return cudaSuccess;  // never recorded: nothing to wait for
  return cuda_emu::EnqueueHostWork(stream, [ev, ticket] { cuda_emu::WaitEvent(ev, ticket); });
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  uint64_t ticket = 0;
  cuda_emu::EventState* ev = nullptr;
  {
    std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
    ev = cuda_emu::ResolveEvent(event);
    if (ev == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize");
    ticket = ev->recorded;
  }
  cuda_emu::WaitEvent(ev, ticket);
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
  cuda_emu::EventState* ev = cuda_emu::ResolveEvent(event);
  if (ev == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventQuery");
  return ev->completed >= ev->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  std::lock_guard<std::mutex> lock(cuda_emu::g_ev_mu);
  cuda_emu::EventState* a = cuda_emu::ResolveEvent(start);
  cuda_emu::EventState* b = cuda_emu::ResolveEvent(end);
  if (a == nullptr || b == nullptr || !a->timing || !b->timing || a->recorded == 0 ||
      b->recorded == 0) {
    return Fail(cudaErrorInvalidResourceHandle,
                "cudaEventElapsedTime: an event that is unknown, untimed or never recorded");
  }
  if (a->completed < a->recorded || b->completed < b->recorded) {
    cuda_emu::t_last_error = cudaErrorNotReady;
    return cudaErrorNotReady;
  }
  *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return Fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
  }
  if (value < 0 || value > cuda_emu::kMaxSmemOptin) {
    return Fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                           " bytes of shared memory is above the opt-in " +
                                           std::to_string(cuda_emu::kMaxSmemOptin));
  }
  std::lock_guard<std::mutex> lock(cuda_emu::g_func_mu);
  cuda_emu::g_func_smem[func] = value;
  return cudaSuccess;
}

// Pinned and device memory copy asynchronously. Pageable memory as CUDA documents it: a copy
// from it waits for the stream's earlier work and returns once the bytes are staged (the
// caller may reuse the buffer); a copy to it returns once it is complete.
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (cudaError_t e = CheckCopy(dst, src, count, count, kind, "cudaMemcpyAsync");
      e != cudaSuccess) {
    return e;
  }
  if (count == 0) return cudaSuccess;
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: stream");
  if (Classify(src, count) == Where::kPageable) {
    s->Synchronize();
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                      static_cast<const char*>(src) + count);
    cuda_emu::Submit(s, [=] { std::memcpy(dst, staged->data(), count); });
    return cudaSuccess;
  }
  cuda_emu::Submit(s, [=] { std::memmove(dst, src, count); });
  if (Classify(dst, count) == Where::kPageable) s->Synchronize();
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (cudaError_t e = cudaMemcpyAsync(dst, src, count, kind, nullptr); e != cudaSuccess) {
    return e;
  }
  cuda_emu::Legacy()->Synchronize();
  return cudaSuccess;
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream) {
  if (width > dpitch || width > spitch) {
    return Fail(cudaErrorInvalidValue, "cudaMemcpy2DAsync: width above a pitch");
  }
  const size_t dspan = height == 0 ? 0 : dpitch * (height - 1) + width;
  const size_t sspan = height == 0 ? 0 : spitch * (height - 1) + width;
  if (cudaError_t e = CheckCopy(dst, src, dspan, sspan, kind, "cudaMemcpy2DAsync");
      e != cudaSuccess) {
    return e;
  }
  return cuda_emu::EnqueueHostWork(stream, [=] {
    for (size_t r = 0; r < height; ++r) {
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                   width);
    }
  });
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream) {
  if (cudaError_t e =
          CheckSide(dst, count, true, "destination", cudaMemcpyHostToDevice, "cudaMemsetAsync");
      e != cudaSuccess) {
    return e;
  }
  return cuda_emu::EnqueueHostWork(stream, [=] { std::memset(dst, value, count); });
}

}  // extern "C"
