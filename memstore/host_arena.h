// The memstore's host-RAM tier: one shared-memory region (a memfd of its own, or memory UCX
// allocated for sharing), pre-faulted at creation so the hot path never takes a first-touch
// fault, carved into extents by a first-fit allocator with coalescing. Thread-safe.
#ifndef LUMEN_MEMSTORE_HOST_ARENA_H_
#define LUMEN_MEMSTORE_HOST_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace lumen {

struct ArenaStats {
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;
  int64_t largest_free_bytes = 0;
  int64_t free_extents = 0;
  // 1 - largest_free / total_free: 0 when the free space is one extent.
  double fragmentation = 0;
};

class HostArena {
 public:
  // Every extent starts on this boundary (O_DIRECT-safe, page-aligned).
  static constexpr int64_t kAlignment = 4096;

  // Creates and pre-faults a `capacity_bytes` region named `name` (visible in /proc/PID/fd).
  // RESOURCE_EXHAUSTED when the memory cannot be had.
  static absl::StatusOr<std::unique_ptr<HostArena>> Create(int64_t capacity_bytes,
                                                           const std::string& name);
  // An arena over memory someone else owns (e.g. a region UCX allocated so that other
  // processes can map it), which must outlive the arena. Touches every page now. `base` must
  // be kAlignment-aligned. fd() is -1.
  static absl::StatusOr<std::unique_ptr<HostArena>> CreateOver(void* base, int64_t capacity);
  ~HostArena();

  // An extent of at least `bytes`. RESOURCE_EXHAUSTED naming the sizes when none is free.
  absl::StatusOr<int64_t> Allocate(int64_t bytes);
  // Returns the extent at `offset` (as returned by Allocate). INVALID_ARGUMENT if unknown.
  absl::Status Free(int64_t offset);

  uint8_t* data() const { return base_; }
  int64_t capacity() const { return capacity_; }
  // The memfd, for sharing the region with other processes.
  int fd() const { return fd_; }
  ArenaStats Stats() const;

 private:
  HostArena(uint8_t* base, int64_t capacity, int fd, bool owned);

  uint8_t* const base_;
  const int64_t capacity_;
  const int fd_;
  const bool owned_;

  mutable absl::Mutex mu_;
  std::map<int64_t, int64_t> free_ ABSL_GUARDED_BY(mu_);  // offset -> size
  std::map<int64_t, int64_t> used_ ABSL_GUARDED_BY(mu_);  // offset -> size
  int64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_HOST_ARENA_H_
