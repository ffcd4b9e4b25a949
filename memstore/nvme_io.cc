#include "memstore/nvme_io.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace lumen {

absl::StatusOr<std::unique_ptr<UringNvmeIo>> UringNvmeIo::Create(UringNvmeIoOptions options) {
  if (options.queue_depth < 1 || options.chunk_bytes < 4096) {
    return absl::InvalidArgumentError("queue depth must be >= 1 and chunks >= 4096 bytes");
  }
  // Check once that io_uring works here, so later failures are about files.
  io_uring ring;
  const int rc = io_uring_queue_init(options.queue_depth, &ring, 0);
  if (rc < 0) return absl::UnavailableError(absl::StrCat("io_uring: ", strerror(-rc)));
  io_uring_queue_exit(&ring);
  return std::unique_ptr<UringNvmeIo>(new UringNvmeIo(options));
}

int64_t UringNvmeIo::Alignment(const std::string& dir) {
  int64_t align = 4096;
  struct statx st;
  if (statx(AT_FDCWD, dir.c_str(), 0, STATX_DIOALIGN, &st) == 0 &&
      (st.stx_mask & STATX_DIOALIGN)) {
    align = std::max<int64_t>(align, st.stx_dio_offset_align);
    align = std::max<int64_t>(align, st.stx_dio_mem_align);
  }
  return align;
}

bool UringNvmeIo::used_buffered_io() const {
  absl::MutexLock lock(&mu_);
  return buffered_;
}

int UringNvmeIo::Open(const std::string& path, bool write, bool* direct) {
  const int flags = (write ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY) | O_CLOEXEC;
  int fd = open(path.c_str(), flags | O_DIRECT, 0644);
  *direct = fd >= 0;
  if (fd < 0 && errno == EINVAL) {
    fd = open(path.c_str(), flags, 0644);
    if (fd >= 0) {
      absl::MutexLock lock(&mu_);
      if (!buffered_) {
        LOG(WARNING) << path << ": the filesystem refuses O_DIRECT; using buffered I/O";
      }
      buffered_ = true;
    }
  }
  return fd;
}

absl::Status UringNvmeIo::Transfer(const std::vector<int>& fds, const std::vector<FileIo>& files,
                                   bool write) {
  struct Chunk {
    size_t file;
    int64_t offset;
    uint8_t* data;
    int64_t length;
  };
  std::vector<Chunk> chunks;
  for (size_t f = 0; f < files.size(); ++f) {
    for (const IoSegment& s : files[f].segments) {
      for (int64_t done = 0; done < s.length; done += options_.chunk_bytes) {
        chunks.push_back({f, s.offset + done, static_cast<uint8_t*>(s.data) + done,
                          std::min(options_.chunk_bytes, s.length - done)});
      }
    }
  }
  io_uring ring;
  int rc = io_uring_queue_init(options_.queue_depth, &ring, 0);
  if (rc < 0) return absl::UnavailableError(absl::StrCat("io_uring: ", strerror(-rc)));
  absl::Status status;
  size_t next = 0, completed = 0;
  int in_flight = 0;
  while (completed < chunks.size() && status.ok()) {
    while (next < chunks.size() && in_flight < options_.queue_depth) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      const Chunk& c = chunks[next];
      if (write) {
        io_uring_prep_write(sqe, fds[c.file], c.data, c.length, c.offset);
      } else {
        io_uring_prep_read(sqe, fds[c.file], c.data, c.length, c.offset);
      }
      io_uring_sqe_set_data64(sqe, next);
      ++next;
      ++in_flight;
    }
    io_uring_submit(&ring);
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(&ring, &cqe);
    if (rc < 0) {
      status = absl::InternalError(absl::StrCat("io_uring wait: ", strerror(-rc)));
      break;
    }
    const Chunk& c = chunks[io_uring_cqe_get_data64(cqe)];
    const std::string& path = files[c.file].path;
    const int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    --in_flight;
    ++completed;
    if (res < 0) {
      status = (write && res == -ENOSPC)
                   ? absl::ResourceExhaustedError(absl::StrCat(path, ": ", strerror(-res)))
                   : absl::InternalError(absl::StrCat(path, ": ", write ? "write" : "read",
                                                      " at ", c.offset, ": ", strerror(-res)));
    } else if (res != c.length) {
      // Short read: the file was truncated. (A short write would mean a full disk.)
      status = write ? absl::ResourceExhaustedError(absl::StrCat(
                           path, ": short write at ", c.offset, " (", res, " of ", c.length,
                           " bytes): disk full?"))
                     : absl::DataLossError(absl::StrCat(path, " is truncated: read ", res,
                                                        " of ", c.length, " bytes at offset ",
                                                        c.offset));
    }
  }
  // Drain what is still in flight before the buffers go away.
  while (in_flight > 0) {
    io_uring_cqe* cqe = nullptr;
    if (io_uring_wait_cqe(&ring, &cqe) < 0) break;
    io_uring_cqe_seen(&ring, cqe);
    --in_flight;
  }
  io_uring_queue_exit(&ring);
  return status;
}

absl::Status UringNvmeIo::WriteFiles(const std::vector<FileIo>& files) {
  std::vector<int> fds;
  absl::Status status;
  for (const FileIo& file : files) {
    bool direct = false;
    const int fd = Open(file.path, /*write=*/true, &direct);
    if (fd < 0) {
      const int err = errno;
      status = err == ENOSPC
                   ? absl::ResourceExhaustedError(absl::StrCat(file.path, ": ", strerror(err)))
                   : absl::InternalError(
                         absl::StrCat("cannot create ", file.path, ": ", strerror(err)));
      break;
    }
    fds.push_back(fd);
    // Allocate the blocks up front (as fio does by default): O_DIRECT writes into allocated
    // extents avoid block allocation and unwritten-extent conversion on the write path.
    int64_t length = 0;
    for (const IoSegment& seg : file.segments) length = std::max(length, seg.offset + seg.length);
    if (fallocate(fd, 0, 0, length) != 0 && errno == ENOSPC) {
      status = absl::ResourceExhaustedError(absl::StrCat(file.path, ": ", strerror(ENOSPC)));
      break;
    }
  }
  if (status.ok()) status = Transfer(fds, files, /*write=*/true);
  for (size_t i = 0; i < fds.size(); ++i) {
    if (status.ok() && fdatasync(fds[i]) != 0) {
      status = absl::InternalError(absl::StrCat(files[i].path, ": fdatasync: ", strerror(errno)));
    }
  }
  for (int fd : fds) close(fd);
  if (!status.ok()) {
    for (size_t i = 0; i < fds.size(); ++i) unlink(files[i].path.c_str());
  }
  return status;
}

absl::Status UringNvmeIo::ReadFiles(const std::vector<FileIo>& files) {
  std::vector<int> fds;
  absl::Status status;
  for (const FileIo& file : files) {
    bool direct = false;
    const int fd = Open(file.path, /*write=*/false, &direct);
    if (fd < 0) {
      const int err = errno;
      status = err == ENOENT
                   ? absl::DataLossError(absl::StrCat("page file ", file.path, " is missing"))
                   : absl::InternalError(
                         absl::StrCat("cannot open ", file.path, ": ", strerror(err)));
      break;
    }
    fds.push_back(fd);
  }
  if (status.ok()) status = Transfer(fds, files, /*write=*/false);
  for (int fd : fds) close(fd);
  return status;
}

absl::Status UringNvmeIo::Remove(const std::string& path) {
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot remove ", path, ": ", strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace lumen
