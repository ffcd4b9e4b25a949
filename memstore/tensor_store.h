// The memstore's core: tensors by id in the host tier (a HostArena) or the NVMe tier (page files
// striped across directories), a page table in RocksDB, XXH3 checksums verified on every NVMe
// read, and moves between the tiers. A read of a tensor that is being written or moved waits
// for that to finish. Thread-safe.
#ifndef LUMEN_MEMSTORE_TENSOR_STORE_H_
#define LUMEN_MEMSTORE_TENSOR_STORE_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/node_options.h"
#include "memstore/host_arena.h"
#include "memstore/nvme_io.h"
#include "proto/memstore.pb.h"

namespace rocksdb {
class DB;
}

namespace lumen {

struct TensorStoreOptions {
  // RocksDB directory of the page table (created if missing).
  std::string db_path;
  int64_t host_bytes = 64 << 20;
  std::vector<NvmeDir> nvme_dirs;
  // Tensors on NVMe are cut into pages of this size, striped across the directories. Larger
  // pages mean fewer files; smaller ones spread a tensor over more drives.
  int64_t page_bytes = 64 << 20;
  // Name of the host arena's memfd.
  std::string arena_name = "lumen-memstore";
  // When set, the host tier lives in this memory (host_bytes long, owned by the caller, e.g. a
  // region UCX allocated so workers can map it) instead of a memfd of its own.
  void* host_region = nullptr;
};

struct TierUsage {
  std::string name;  // "host" or "nvme:<dir>"
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;
};

struct StoreCounters {
  int64_t host_read_bytes = 0;
  int64_t host_write_bytes = 0;
  int64_t nvme_read_bytes = 0;
  int64_t nvme_write_bytes = 0;
  int64_t checksum_failures = 0;
  int64_t tensors = 0;
  int64_t lost_tensors = 0;
};

// A tensor held for a reader: its bytes stay at `offset` in the host arena, unchanged, until
// Unpin. NVMe-resident tensors are verified into a staging extent (`staged`).
struct PinnedTensor {
  int64_t offset = 0;
  int64_t size = 0;
  int64_t generation = 0;
  std::string dtype;
  bool staged = false;
};

class TensorStore {
 public:
  // Opens (or creates) the store. Tensors that were in the host tier before a restart are kept
  // as lost records; NVMe page files not referenced by the page table are removed.
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(TensorStoreOptions options,
                                                           std::unique_ptr<NvmeIo> io);
  ~TensorStore();

  // Creates or replaces tensor `id` in `tier`. RESOURCE_EXHAUSTED naming the tier and byte
  // counts when it is full; the previous contents survive any failure.
  absl::Status Write(const std::string& id, const void* data, int64_t size,
                     const std::string& dtype, Tier tier);
  // Two-phase write for clients that fill the bytes themselves (over UCX): BeginWrite reserves
  // a staging extent of `size` bytes in the host arena; CommitWrite makes its contents tensor
  // `id` in `tier` (the extent becomes the tensor's home, or is written to NVMe and released).
  // CommitWrite always takes the extent, also on failure; AbortWrite releases an uncommitted one.
  absl::StatusOr<int64_t> BeginWrite(const std::string& id, int64_t size);
  absl::Status CommitWrite(const std::string& id, int64_t staging_offset, int64_t size,
                           const std::string& dtype, Tier tier);
  void AbortWrite(int64_t staging_offset);
  // Holds tensor `id` readable in the host arena until Unpin; writers, movers and Free wait.
  absl::StatusOr<PinnedTensor> Pin(const std::string& id);
  void Unpin(const std::string& id, const PinnedTensor& pinned);
  // Copies tensor `id` into `dst` (capacity bytes) and returns its size. DATA_LOSS naming the
  // tensor and file when a page fails its checksum or is truncated, or the tensor was lost in
  // a restart; NOT_FOUND when there is no such tensor.
  absl::StatusOr<int64_t> Read(const std::string& id, void* dst, int64_t capacity);
  // Moves tensor `id` to `tier` (no-op when it is there). Readers wait meanwhile.
  absl::Status Move(const std::string& id, Tier tier);
  absl::Status Free(const std::string& id);
  // Ids of the tensors whose id starts with `prefix`, in order.
  std::vector<std::string> TensorIds(const std::string& prefix);
  absl::StatusOr<TensorRecord> Lookup(const std::string& id);
  std::vector<std::string> LostTensors();

  std::vector<TierUsage> Usage();
  StoreCounters Counters();
  ArenaStats HostStats() const { return arena_->Stats(); }
  bool used_buffered_io() const { return io_->used_buffered_io(); }
  HostArena& arena() { return *arena_; }

 private:
  struct Entry {
    TensorRecord record;
    int readers = 0;
    bool busy = false;  // being written, moved or freed
    bool removed = false;  // erased from entries_; waiters must look again
  };

  TensorStore(TensorStoreOptions options, std::unique_ptr<NvmeIo> io,
              std::unique_ptr<HostArena> arena, std::unique_ptr<rocksdb::DB> db);
  absl::Status Recover();
  // Writes the record to the page table; `sync` waits for it to reach the disk. A record that
  // only ever describes host memory need not: its data dies with the process anyway, and the
  // write-ahead log still survives a process crash (what "lost tensors" reports after a
  // restart); only a power loss can drop it, together with the data it described.
  absl::Status Persist(const TensorRecord& record, bool sync = true);
  absl::Status Erase(const std::string& id, bool sync = true);

  // Writes `size` bytes from `data` as pages of generation `generation`; fills `pages`.
  absl::Status WritePages(const std::string& id, int64_t generation, const uint8_t* data,
                          int64_t size, std::vector<PageRecord>* pages);
  absl::Status ReadPages(const TensorRecord& record, uint8_t* dst);
  void RemovePages(const std::vector<PageRecord>& pages);
  std::string PagePath(const PageRecord& page) const;
  // Reserves NVMe bytes in directory `dir` or fails naming it.
  absl::Status Reserve(int dir, int64_t bytes);
  void Release(int dir, int64_t bytes);
  int64_t FileBytes(int dir, int64_t page_size) const;

  // Waits until `id` is idle and marks it busy; NOT_FOUND if absent and !create.
  absl::StatusOr<Entry*> Acquire(const std::string& id, bool create)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseEntry(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Erases `id`, waking whoever waits on it.
  void RemoveEntry(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits until `id` is not busy, counts a reader and returns its record; DATA_LOSS if lost.
  absl::StatusOr<TensorRecord> AddReader(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveReader(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const TensorStoreOptions options_;
  const std::unique_ptr<NvmeIo> io_;
  const std::unique_ptr<HostArena> arena_;
  const std::unique_ptr<rocksdb::DB> db_;
  std::vector<int64_t> alignment_;  // per NVMe directory

  absl::Mutex mu_;
  // shared_ptr: a thread waiting on an entry keeps it alive if another frees it meanwhile.
  std::map<std::string, std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> dir_used_ ABSL_GUARDED_BY(mu_);

  std::atomic<int64_t> host_read_{0}, host_write_{0}, nvme_read_{0}, nvme_write_{0};
  std::atomic<int64_t> checksum_failures_{0};
};

// XXH3-64 of a page: tensor id, page index and generation, then the bytes.
uint64_t PageChecksum(const std::string& id, int64_t page, int64_t generation, const void* data,
                      int64_t size);

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_TENSOR_STORE_H_
