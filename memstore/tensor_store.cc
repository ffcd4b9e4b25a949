#include "memstore/tensor_store.h"

#include <dirent.h>
#include <sys/statvfs.h>
#include <xxhash.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "rocksdb/db.h"

namespace lumen {
namespace {

constexpr char kKeyPrefix[] = "tensor/";
constexpr char kMagic[8] = {'L', 'U', 'M', 'E', 'N', 'P', 'G', '1'};

// The first block of every page file. The rest of the block is zero.
struct PageHeader {
  char magic[8];
  int64_t generation;
  int64_t page;
  int64_t size;
  uint64_t checksum;
  uint32_t id_length;
  // The tensor id follows.
};

int64_t RoundUp(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

struct AlignedBuffer {
  AlignedBuffer(int64_t alignment, int64_t size) {
    if (posix_memalign(&ptr, alignment, std::max<int64_t>(size, alignment)) != 0) ptr = nullptr;
    else memset(ptr, 0, std::max<int64_t>(size, alignment));
  }
  ~AlignedBuffer() { free(ptr); }
  uint8_t* data() const { return static_cast<uint8_t*>(ptr); }
  void* ptr = nullptr;
};

bool Aligned(const void* p, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

std::string HexId(const std::string& id) {
  return absl::StrFormat("%016x", XXH3_64bits(id.data(), id.size()));
}

}  // namespace

uint64_t PageChecksum(const std::string& id, int64_t page, int64_t generation, const void* data,
                      int64_t size) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, id.data(), id.size());
  XXH3_64bits_update(state, &page, sizeof(page));
  XXH3_64bits_update(state, &generation, sizeof(generation));
  XXH3_64bits_update(state, data, size);
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return digest;
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(TensorStoreOptions options,
                                                               std::unique_ptr<NvmeIo> io) {
  if (options.page_bytes < 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("page size ", options.page_bytes, " must be at least 4096 bytes"));
  }
  for (const NvmeDir& dir : options.nvme_dirs) {
    std::error_code ec;
    std::filesystem::create_directories(dir.path, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("--nvme-dir ", dir.path, ": ", ec.message()));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<HostArena> arena,
                   options.host_region != nullptr
                       ? HostArena::CreateOver(options.host_region, options.host_bytes)
                       : HostArena::Create(options.host_bytes, options.arena_name));
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(options.db_path).parent_path(), ec);
  rocksdb::Options db_options;
  db_options.create_if_missing = true;
  db_options.keep_log_file_num = 3;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, options.db_path, &raw);
  if (!s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot open the page table ", options.db_path, ": ", s.ToString()));
  }
  std::unique_ptr<TensorStore> store(new TensorStore(std::move(options), std::move(io),
                                                     std::move(arena),
                                                     std::unique_ptr<rocksdb::DB>(raw)));
  RETURN_IF_ERROR(store->Recover());
  return store;
}

TensorStore::TensorStore(TensorStoreOptions options, std::unique_ptr<NvmeIo> io,
                         std::unique_ptr<HostArena> arena, std::unique_ptr<rocksdb::DB> db)
    : options_(std::move(options)),
      io_(std::move(io)),
      arena_(std::move(arena)),
      db_(std::move(db)) {
  for (const NvmeDir& dir : options_.nvme_dirs) alignment_.push_back(io_->Alignment(dir.path));
  dir_used_.assign(options_.nvme_dirs.size(), 0);
}

TensorStore::~TensorStore() = default;

int64_t TensorStore::FileBytes(int dir, int64_t page_size) const {
  return alignment_[dir] + RoundUp(page_size, alignment_[dir]);
}

std::string TensorStore::PagePath(const PageRecord& page) const {
  return (std::filesystem::path(options_.nvme_dirs[page.dir()].path) / page.file()).string();
}

absl::Status TensorStore::Recover() {
  std::set<std::string> referenced;
  std::vector<TensorRecord> lost;
  {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(kKeyPrefix); it->Valid() && it->key().starts_with(kKeyPrefix); it->Next()) {
      TensorRecord record;
      if (!record.ParseFromArray(it->value().data(), it->value().size())) {
        return absl::DataLossError(absl::StrCat(options_.db_path, ": cannot parse the record ",
                                                it->key().ToString()));
      }
      if (record.tier() == TIER_HOST && !record.lost()) {
        record.set_lost(true);
        lost.push_back(record);
      }
      for (const PageRecord& page : record.pages()) {
        if (page.dir() >= static_cast<int>(options_.nvme_dirs.size())) {
          LOG(ERROR) << "tensor " << record.id() << " has a page in NVMe directory #"
                     << page.dir() << ", which is no longer configured; it is lost";
          record.set_lost(true);
          lost.push_back(record);
          break;
        }
        referenced.insert(PagePath(page));
        dir_used_[page.dir()] += FileBytes(page.dir(), page.size());
      }
      entries_[record.id()] = std::make_shared<Entry>();
      entries_[record.id()]->record = record;
    }
  }
  for (const TensorRecord& record : lost) RETURN_IF_ERROR(Persist(record));
  if (!lost.empty()) {
    LOG(WARNING) << lost.size() << " tensors were in host memory when the memstore stopped "
                 << "and are lost";
  }
  // Page files that no record references are leftovers of writes that never committed.
  for (const NvmeDir& dir : options_.nvme_dirs) {
    std::error_code ec;
    for (const auto& file : std::filesystem::directory_iterator(dir.path, ec)) {
      const std::string path = file.path().string();
      if (absl::EndsWith(path, ".page") && !referenced.count(path)) {
        LOG(INFO) << "removing uncommitted page file " << path;
        (void)io_->Remove(path);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status TensorStore::Persist(const TensorRecord& record, bool sync) {
  rocksdb::WriteOptions options;
  options.sync = sync;
  rocksdb::Status s = db_->Put(options, kKeyPrefix + record.id(), record.SerializeAsString());
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat(options_.db_path, ": ", s.ToString()));
  }
  return absl::OkStatus();
}

absl::Status TensorStore::Erase(const std::string& id, bool sync) {
  rocksdb::WriteOptions options;
  options.sync = sync;
  rocksdb::Status s = db_->Delete(options, kKeyPrefix + id);
  if (!s.ok()) return absl::InternalError(absl::StrCat(options_.db_path, ": ", s.ToString()));
  return absl::OkStatus();
}

absl::Status TensorStore::Reserve(int dir, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  const NvmeDir& d = options_.nvme_dirs[dir];
  int64_t capacity = d.capacity_bytes;
  if (capacity == 0) {
    struct statvfs fs;
    if (statvfs(d.path.c_str(), &fs) == 0) {
      capacity = dir_used_[dir] + static_cast<int64_t>(fs.f_bavail) * fs.f_frsize;
    }
  }
  if (capacity > 0 && dir_used_[dir] + bytes > capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "NVMe tier ", d.path, " is full: ", bytes, " bytes needed, ", dir_used_[dir], " of ",
        capacity, " bytes used"));
  }
  dir_used_[dir] += bytes;
  return absl::OkStatus();
}

void TensorStore::Release(int dir, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  dir_used_[dir] -= bytes;
}

absl::Status TensorStore::WritePages(const std::string& id, int64_t generation,
                                     const uint8_t* data, int64_t size,
                                     std::vector<PageRecord>* pages) {
  const int ndirs = static_cast<int>(options_.nvme_dirs.size());
  if (ndirs == 0) {
    return absl::FailedPreconditionError("the NVMe tier has no directories (--nvme-dir)");
  }
  const int first_dir = static_cast<int>(XXH3_64bits(id.data(), id.size()) % ndirs);
  const int64_t count =
      std::max<int64_t>(1, (size + options_.page_bytes - 1) / options_.page_bytes);
  // Every page of the tensor goes out in one stream of requests, synced at the end.
  std::vector<std::unique_ptr<AlignedBuffer>> buffers;
  std::vector<FileIo> files;
  std::vector<PageRecord> planned;
  absl::Status status;
  for (int64_t p = 0; p < count; ++p) {
    const int dir = static_cast<int>((first_dir + p) % ndirs);
    const int64_t align = alignment_[dir];
    const int64_t offset = p * options_.page_bytes;
    const int64_t len = std::min(options_.page_bytes, size - offset);
    const uint8_t* src = data + offset;
    PageRecord page;
    page.set_dir(dir);
    page.set_file(absl::StrCat(HexId(id), ".", p, ".", generation, ".page"));
    page.set_size(len);
    page.set_checksum(PageChecksum(id, p, generation, src, len));
    status = Reserve(dir, FileBytes(dir, len));
    if (!status.ok()) break;
    planned.push_back(page);
    buffers.push_back(std::make_unique<AlignedBuffer>(align, align));
    uint8_t* header = buffers.back()->data();
    PageHeader h{};
    memcpy(h.magic, kMagic, sizeof(kMagic));
    h.generation = generation;
    h.page = p;
    h.size = len;
    h.checksum = page.checksum();
    h.id_length = static_cast<uint32_t>(std::min<size_t>(id.size(), align - sizeof(h)));
    FileIo file{PagePath(page), {}};
    if (header == nullptr) {
      status = absl::ResourceExhaustedError("cannot allocate an aligned page header");
      break;
    }
    memcpy(header, &h, sizeof(h));
    memcpy(header + sizeof(h), id.data(), h.id_length);
    file.segments.push_back({0, header, align});
    const int64_t padded = RoundUp(len, align);
    if (padded == len && Aligned(src, align)) {
      file.segments.push_back({align, const_cast<uint8_t*>(src), len});
    } else {
      buffers.push_back(std::make_unique<AlignedBuffer>(align, padded));
      if (buffers.back()->ptr == nullptr) {
        status = absl::ResourceExhaustedError("cannot allocate a staging buffer");
        break;
      }
      memcpy(buffers.back()->data(), src, len);
      file.segments.push_back({align, buffers.back()->data(), padded});
    }
    files.push_back(std::move(file));
  }
  if (status.ok()) {
    status = io_->WriteFiles(files);
    if (!status.ok()) {
      status = absl::Status(status.code(),
                            absl::StrCat("writing tensor ", id, ": ", status.message()));
    }
  }
  if (!status.ok()) {
    for (const PageRecord& page : planned) Release(page.dir(), FileBytes(page.dir(), page.size()));
    return status;
  }
  nvme_write_ += size;
  *pages = std::move(planned);
  return absl::OkStatus();
}

void TensorStore::RemovePages(const std::vector<PageRecord>& pages) {
  for (const PageRecord& page : pages) {
    (void)io_->Remove(PagePath(page));
    Release(page.dir(), FileBytes(page.dir(), page.size()));
  }
}

absl::Status TensorStore::ReadPages(const TensorRecord& record, uint8_t* dst) {
  // All pages in one stream of requests; then each is verified.
  std::vector<std::unique_ptr<AlignedBuffer>> headers;
  std::vector<std::unique_ptr<AlignedBuffer>> staging(record.pages_size());
  std::vector<FileIo> files;
  int64_t offset = 0;
  for (int p = 0; p < record.pages_size(); ++p) {
    const PageRecord& page = record.pages(p);
    const int64_t align = alignment_[page.dir()];
    const int64_t len = page.size();
    const int64_t padded = RoundUp(len, align);
    headers.push_back(std::make_unique<AlignedBuffer>(align, align));
    uint8_t* target = dst + offset;
    FileIo file{PagePath(page), {{0, headers.back()->data(), align}}};
    if (padded == len && Aligned(target, align)) {
      file.segments.push_back({align, target, len});
    } else {
      staging[p] = std::make_unique<AlignedBuffer>(align, padded);
      file.segments.push_back({align, staging[p]->data(), padded});
    }
    if (headers.back()->ptr == nullptr || (staging[p] && staging[p]->ptr == nullptr)) {
      return absl::ResourceExhaustedError("cannot allocate an aligned read buffer");
    }
    files.push_back(std::move(file));
    offset += len;
  }
  absl::Status status = io_->ReadFiles(files);
  if (!status.ok()) {
    if (status.code() == absl::StatusCode::kDataLoss) ++checksum_failures_;
    return absl::Status(status.code(),
                        absl::StrCat("tensor ", record.id(), ": ", status.message()));
  }
  offset = 0;
  for (int p = 0; p < record.pages_size(); ++p) {
    const PageRecord& page = record.pages(p);
    const int64_t len = page.size();
    uint8_t* target = dst + offset;
    if (staging[p]) memcpy(target, staging[p]->data(), len);
    PageHeader h;
    memcpy(&h, headers[p]->data(), sizeof(h));
    const uint64_t sum = PageChecksum(record.id(), p, record.generation(), target, len);
    std::string problem;
    if (memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) {
      problem = "bad page header";
    } else if (h.page != p || h.generation != record.generation() || h.size != len) {
      problem = absl::StrCat("header says page ", h.page, " generation ", h.generation, " size ",
                             h.size, ", expected page ", p, " generation ",
                             record.generation(), " size ", len);
    } else if (sum != page.checksum() || h.checksum != page.checksum()) {
      problem = absl::StrFormat("checksum mismatch (stored %016x, computed %016x)",
                                page.checksum(), sum);
    }
    if (!problem.empty()) {
      ++checksum_failures_;
      return absl::DataLossError(absl::StrCat("tensor ", record.id(), " page ", p, " in ",
                                              PagePath(page), ": ", problem));
    }
    offset += len;
  }
  nvme_read_ += offset;
  return absl::OkStatus();
}

absl::StatusOr<TensorStore::Entry*> TensorStore::Acquire(const std::string& id, bool create) {
  while (true) {
    auto it = entries_.find(id);
    if (it == entries_.end()) {
      if (!create) return absl::NotFoundError(absl::StrCat("no tensor ", id));
      it = entries_.emplace(id, std::make_shared<Entry>()).first;
      it->second->busy = true;
      return it->second.get();
    }
    // Holding the shared_ptr keeps the entry alive if it is freed while we wait.
    std::shared_ptr<Entry> entry = it->second;
    auto idle = [&entry]() { return entry->removed || (!entry->busy && entry->readers == 0); };
    mu_.Await(absl::Condition(&idle));
    it = entries_.find(id);
    if (it != entries_.end() && it->second == entry) {
      entry->busy = true;
      return entry.get();
    }
    // Freed (and maybe recreated) while we waited: look again.
  }
}

absl::StatusOr<TensorRecord> TensorStore::AddReader(const std::string& id) {
  while (true) {
    auto it = entries_.find(id);
    if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", id));
    std::shared_ptr<Entry> entry = it->second;
    auto readable = [&entry]() { return entry->removed || !entry->busy; };
    mu_.Await(absl::Condition(&readable));
    it = entries_.find(id);
    if (it == entries_.end() || it->second != entry) continue;
    if (entry->record.lost()) {
      return absl::DataLossError(absl::StrCat(
          "tensor ", id, " was in host memory when the memstore restarted and is lost"));
    }
    ++entry->readers;
    return entry->record;
  }
}

void TensorStore::RemoveReader(const std::string& id) {
  auto it = entries_.find(id);
  if (it != entries_.end() && it->second->readers > 0) --it->second->readers;
}

void TensorStore::RemoveEntry(const std::string& id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  it->second->removed = true;
  entries_.erase(it);
}

void TensorStore::ReleaseEntry(const std::string& id) {
  auto it = entries_.find(id);
  if (it != entries_.end()) it->second->busy = false;
}

absl::StatusOr<int64_t> TensorStore::BeginWrite(const std::string& id, int64_t size) {
  if (id.empty()) return absl::InvalidArgumentError("tensor id is empty");
  if (size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", id, ": size ", size));
  }
  absl::StatusOr<int64_t> offset = arena_->Allocate(size);
  if (!offset.ok()) {
    return absl::Status(offset.status().code(),
                        absl::StrCat("tensor ", id, ": ", offset.status().message()));
  }
  return *offset;
}

void TensorStore::AbortWrite(int64_t staging_offset) { (void)arena_->Free(staging_offset); }

absl::Status TensorStore::Write(const std::string& id, const void* data, int64_t size,
                                const std::string& dtype, Tier tier) {
  ASSIGN_OR_RETURN(int64_t offset, BeginWrite(id, size));
  memcpy(arena_->data() + offset, data, size);
  return CommitWrite(id, offset, size, dtype, tier);
}

absl::Status TensorStore::CommitWrite(const std::string& id, int64_t staging_offset,
                                      int64_t size, const std::string& dtype, Tier tier) {
  if (tier != TIER_HOST && tier != TIER_NVME) {
    AbortWrite(staging_offset);
    return absl::InvalidArgumentError(absl::StrCat("tensor ", id, ": no tier given"));
  }
  TensorRecord old;
  bool existed;
  {
    absl::MutexLock lock(&mu_);
    existed = entries_.count(id) > 0;
    absl::StatusOr<Entry*> entry = Acquire(id, /*create=*/true);
    if (!entry.ok()) {
      AbortWrite(staging_offset);
      return entry.status();
    }
    old = (*entry)->record;
  }
  TensorRecord record;
  record.set_id(id);
  record.set_size(size);
  record.set_dtype(dtype);
  record.set_tier(tier);
  record.set_generation(old.generation() + 1);
  absl::Status status;
  std::vector<PageRecord> pages;
  if (tier == TIER_HOST) {
    record.set_host_offset(staging_offset);  // The staging extent becomes the tensor's home.
    host_write_ += size;
  } else {
    status = WritePages(id, record.generation(), arena_->data() + staging_offset, size, &pages);
    for (const PageRecord& page : pages) *record.add_pages() = page;
  }
  if (status.ok()) {
    // Host over host (the offloading hot path) needs no fsync; anything touching NVMe does.
    status = Persist(record, tier == TIER_NVME || (existed && old.tier() == TIER_NVME));
    if (!status.ok()) RemovePages(pages);
  }
  if (!status.ok() || tier == TIER_NVME) AbortWrite(staging_offset);
  absl::MutexLock lock(&mu_);
  if (!status.ok()) {
    if (existed) {
      ReleaseEntry(id);
    } else {
      RemoveEntry(id);
    }
    return status;
  }
  // The new generation is durable; the old one can go.
  if (existed && !old.lost()) {
    if (old.tier() == TIER_HOST) (void)arena_->Free(old.host_offset());
    std::vector<PageRecord> old_pages(old.pages().begin(), old.pages().end());
    mu_.Unlock();
    RemovePages(old_pages);
    mu_.Lock();
  }
  entries_[id]->record = record;
  ReleaseEntry(id);
  return absl::OkStatus();
}

absl::StatusOr<PinnedTensor> TensorStore::Pin(const std::string& id) {
  TensorRecord record;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(record, AddReader(id));
  }
  PinnedTensor pinned;
  pinned.size = record.size();
  pinned.generation = record.generation();
  pinned.dtype = record.dtype();
  absl::Status status;
  if (record.tier() == TIER_HOST) {
    pinned.offset = record.host_offset();
  } else {
    // NVMe-resident: verify the pages into a staging extent that lives until Unpin.
    absl::StatusOr<int64_t> offset = arena_->Allocate(record.size());
    if (!offset.ok()) {
      status = absl::Status(offset.status().code(),
                            absl::StrCat("staging tensor ", id, ": ", offset.status().message()));
    } else {
      pinned.offset = *offset;
      pinned.staged = true;
      status = ReadPages(record, arena_->data() + pinned.offset);
      if (!status.ok()) (void)arena_->Free(pinned.offset);
    }
  }
  if (!status.ok()) {
    absl::MutexLock lock(&mu_);
    RemoveReader(id);
    return status;
  }
  return pinned;
}

void TensorStore::Unpin(const std::string& id, const PinnedTensor& pinned) {
  if (pinned.staged) (void)arena_->Free(pinned.offset);
  absl::MutexLock lock(&mu_);
  RemoveReader(id);
}

absl::StatusOr<int64_t> TensorStore::Read(const std::string& id, void* dst, int64_t capacity) {
  TensorRecord record;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(record, AddReader(id));
    if (record.size() > capacity) {
      RemoveReader(id);
      return absl::InvalidArgumentError(absl::StrCat("tensor ", id, " has ", record.size(),
                                                     " bytes; the buffer holds ", capacity));
    }
  }
  absl::Status status;
  if (record.tier() == TIER_HOST) {
    memcpy(dst, arena_->data() + record.host_offset(), record.size());
    host_read_ += record.size();
  } else {
    status = ReadPages(record, static_cast<uint8_t*>(dst));
  }
  absl::MutexLock lock(&mu_);
  RemoveReader(id);
  if (!status.ok()) return status;
  return record.size();
}

absl::Status TensorStore::Move(const std::string& id, Tier tier) {
  TensorRecord old;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Entry * entry, Acquire(id, /*create=*/false));
    old = entry->record;
    if (old.lost()) {
      ReleaseEntry(id);
      return absl::DataLossError(absl::StrCat("tensor ", id, " is lost; it cannot be moved"));
    }
    if (old.tier() == tier) {
      ReleaseEntry(id);
      return absl::OkStatus();
    }
  }
  TensorRecord record = old;
  record.set_tier(tier);
  record.clear_pages();
  record.clear_host_offset();
  absl::Status status;
  int64_t new_offset = -1;
  std::vector<PageRecord> pages;
  if (tier == TIER_NVME) {
    // Pages keep the generation: the bytes are the same.
    status = WritePages(id, old.generation(), arena_->data() + old.host_offset(), old.size(),
                        &pages);
    for (const PageRecord& page : pages) *record.add_pages() = page;
  } else {
    absl::StatusOr<int64_t> offset = arena_->Allocate(old.size());
    if (!offset.ok()) {
      status = absl::Status(offset.status().code(),
                            absl::StrCat("tensor ", id, ": ", offset.status().message()));
    } else {
      new_offset = *offset;
      record.set_host_offset(new_offset);
      status = ReadPages(old, arena_->data() + new_offset);
      if (!status.ok()) (void)arena_->Free(new_offset);
    }
  }
  if (status.ok()) {
    status = Persist(record);
    if (!status.ok()) {
      if (new_offset >= 0) (void)arena_->Free(new_offset);
      RemovePages(pages);
    }
  }
  if (status.ok()) {
    if (old.tier() == TIER_HOST) {
      (void)arena_->Free(old.host_offset());
    } else {
      RemovePages(std::vector<PageRecord>(old.pages().begin(), old.pages().end()));
      host_write_ += old.size();
    }
  }
  absl::MutexLock lock(&mu_);
  if (status.ok()) entries_[id]->record = record;
  ReleaseEntry(id);
  return status;
}

absl::Status TensorStore::Free(const std::string& id) {
  TensorRecord old;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Entry * entry, Acquire(id, /*create=*/false));
    old = entry->record;
  }
  // A host tensor's record need not reach the disk before it goes (see Persist).
  absl::Status status = Erase(id, old.tier() != TIER_HOST);
  if (status.ok() && !old.lost()) {
    if (old.tier() == TIER_HOST) {
      (void)arena_->Free(old.host_offset());
    } else {
      RemovePages(std::vector<PageRecord>(old.pages().begin(), old.pages().end()));
    }
  }
  absl::MutexLock lock(&mu_);
  if (status.ok()) {
    RemoveEntry(id);
  } else {
    ReleaseEntry(id);
  }
  return status;
}

std::vector<std::string> TensorStore::TensorIds(const std::string& prefix) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (auto it = entries_.lower_bound(prefix);
       it != entries_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    ids.push_back(it->first);
  }
  return ids;
}

absl::StatusOr<TensorRecord> TensorStore::Lookup(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", id));
  return it->second->record;
}

std::vector<std::string> TensorStore::LostTensors() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> lost;
  for (const auto& [id, entry] : entries_) {
    if (entry->record.lost()) lost.push_back(id);
  }
  return lost;
}

std::vector<TierUsage> TensorStore::Usage() {
  std::vector<TierUsage> tiers;
  const ArenaStats host = arena_->Stats();
  tiers.push_back({"host", host.capacity_bytes, host.used_bytes});
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < options_.nvme_dirs.size(); ++i) {
    const NvmeDir& dir = options_.nvme_dirs[i];
    int64_t capacity = dir.capacity_bytes;
    if (capacity == 0) {
      struct statvfs fs;
      if (statvfs(dir.path.c_str(), &fs) == 0) {
        capacity = dir_used_[i] + static_cast<int64_t>(fs.f_bavail) * fs.f_frsize;
      }
    }
    tiers.push_back({absl::StrCat("nvme:", dir.path), capacity, dir_used_[i]});
  }
  return tiers;
}

StoreCounters TensorStore::Counters() {
  StoreCounters c;
  c.host_read_bytes = host_read_;
  c.host_write_bytes = host_write_;
  c.nvme_read_bytes = nvme_read_;
  c.nvme_write_bytes = nvme_write_;
  c.checksum_failures = checksum_failures_;
  absl::MutexLock lock(&mu_);
  c.tensors = static_cast<int64_t>(entries_.size());
  for (const auto& [id, entry] : entries_) c.lost_tensors += entry->record.lost() ? 1 : 0;
  return c;
}

}  // namespace lumen
