// Byte quantities as people write them ("64MiB", "1.5GiB", "512MB") and as we print them.
// Free functions; thread-safe.
#ifndef LUMEN_COMMON_UNITS_H_
#define LUMEN_COMMON_UNITS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lumen {

// Parses a byte count: a non-negative number (integer or decimal fraction) followed by an
// optional unit. Binary units: B, KiB, MiB, GiB, TiB (powers of 1024); decimal units: KB, MB,
// GB, TB (powers of 1000). Units are case-insensitive ("64mib" works) and may be separated from
// the number by spaces. A bare number is bytes. Fractions are rounded to the nearest byte.
// Returns InvalidArgument naming the text when it is not a byte count, is negative, or does
// not fit in int64_t.
absl::StatusOr<int64_t> ParseBytes(absl::string_view text);

// Formats `bytes` with the largest binary unit that keeps the value >= 1 and one decimal:
// 67108864 -> "64.0 MiB", 1536 -> "1.5 KiB". Values below 1 KiB print as "512 B".
std::string FormatBytes(int64_t bytes);

}  // namespace lumen

#endif  // LUMEN_COMMON_UNITS_H_
