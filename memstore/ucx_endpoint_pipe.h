// Passing a UcxEndpointInfo to another process through a pipe, for tests and benchmarks that
// run a serving process of their own (in a node the memstore's GetDataPlane rpc does this).
// Header-only; thread-compatible.
#ifndef LUMEN_MEMSTORE_UCX_ENDPOINT_PIPE_H_
#define LUMEN_MEMSTORE_UCX_ENDPOINT_PIPE_H_

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>

#include "memstore/ucx_transport.h"

namespace lumen {
namespace ucx_pipe_internal {

inline bool WriteAll(int fd, const void* data, size_t length) {
  const char* p = static_cast<const char*>(data);
  while (length > 0) {
    const ssize_t n = write(fd, p, length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    length -= n;
  }
  return true;
}

inline bool ReadAll(int fd, void* data, size_t length) {
  char* p = static_cast<char*>(data);
  while (length > 0) {
    const ssize_t n = read(fd, p, length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    length -= n;
  }
  return true;
}

}  // namespace ucx_pipe_internal

// A length-prefixed string (at most 1 MiB).
inline bool WritePipeString(int fd, const std::string& s) {
  using namespace ucx_pipe_internal;
  const uint64_t size = s.size();
  return WriteAll(fd, &size, sizeof(size)) && WriteAll(fd, s.data(), s.size());
}

inline bool ReadPipeString(int fd, std::string* s) {
  using namespace ucx_pipe_internal;
  uint64_t size = 0;
  if (!ReadAll(fd, &size, sizeof(size)) || size > (1 << 20)) return false;
  s->resize(size);
  return ReadAll(fd, s->data(), size);
}

// Returns false when the pipe closed or failed.
inline bool WriteEndpointInfo(int fd, const UcxEndpointInfo& info) {
  using namespace ucx_pipe_internal;
  return WritePipeString(fd, info.worker_address) && WritePipeString(fd, info.rkey) &&
         WriteAll(fd, &info.base_address, sizeof(info.base_address)) &&
         WriteAll(fd, &info.length, sizeof(info.length));
}

inline bool ReadEndpointInfo(int fd, UcxEndpointInfo* info) {
  using namespace ucx_pipe_internal;
  return ReadPipeString(fd, &info->worker_address) && ReadPipeString(fd, &info->rkey) &&
         ReadAll(fd, &info->base_address, sizeof(info->base_address)) &&
         ReadAll(fd, &info->length, sizeof(info->length));
}

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_UCX_ENDPOINT_PIPE_H_
