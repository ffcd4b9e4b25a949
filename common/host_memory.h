// How much host memory processes may still take.
#ifndef LUMEN_COMMON_HOST_MEMORY_H_
#define LUMEN_COMMON_HOST_MEMORY_H_

#include <cstdint>

namespace lumen {

// The host's MemAvailable (/proc/meminfo) in bytes, or -1 when it cannot be read.
int64_t AvailableHostBytes();

}  // namespace lumen

#endif  // LUMEN_COMMON_HOST_MEMORY_H_
