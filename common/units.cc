#include "common/units.h"

#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lumen {
namespace {

struct Unit {
  const char* name;  // lower case
  int64_t multiplier;
};

constexpr int64_t kKi = 1024;
constexpr Unit kUnits[] = {
    {"", 1},
    {"b", 1},
    {"kib", kKi},
    {"mib", kKi * kKi},
    {"gib", kKi * kKi * kKi},
    {"tib", kKi * kKi * kKi * kKi},
    {"kb", 1000},
    {"mb", 1000 * 1000},
    {"gb", 1000 * 1000 * 1000},
    {"tb", int64_t{1000} * 1000 * 1000 * 1000},
};

absl::Status BadBytes(absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("invalid byte count \"", text, "\": ", why));
}

}  // namespace

absl::StatusOr<int64_t> ParseBytes(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  if (s.empty()) return BadBytes(text, "empty");

  // Split into the number (digits with at most one '.') and the unit.
  size_t i = 0;
  bool seen_dot = false;
  int digits = 0;
  while (i < s.size() && (absl::ascii_isdigit(s[i]) || (s[i] == '.' && !seen_dot))) {
    if (s[i] == '.') {
      seen_dot = true;
    } else {
      ++digits;
    }
    ++i;
  }
  if (digits == 0) {
    return BadBytes(text, s[0] == '-' ? "must not be negative"
                                      : "expected a number such as 4096, 64MiB or 1.5GiB");
  }
  absl::string_view number = s.substr(0, i);
  std::string unit = absl::AsciiStrToLower(absl::StripLeadingAsciiWhitespace(s.substr(i)));

  const Unit* found = nullptr;
  for (const Unit& u : kUnits) {
    if (unit == u.name) {
      found = &u;
      break;
    }
  }
  if (found == nullptr) {
    return BadBytes(text, absl::StrCat("unknown unit \"", unit,
                                       "\" (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"));
  }

  if (!seen_dot) {
    uint64_t value = 0;
    if (!absl::SimpleAtoi(number, &value) ||
        value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / found->multiplier)) {
      return BadBytes(text, "too large");
    }
    return static_cast<int64_t>(value) * found->multiplier;
  }
  double value = 0;
  if (!absl::SimpleAtod(number, &value)) return BadBytes(text, "not a number");
  long double bytes = std::roundl(static_cast<long double>(value) * found->multiplier);
  if (!(bytes < static_cast<long double>(std::numeric_limits<int64_t>::max()))) {
    return BadBytes(text, "too large");
  }
  return static_cast<int64_t>(bytes);
}

std::string FormatBytes(int64_t bytes) {
  static constexpr const char* kNames[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  // Work on the magnitude as unsigned so that INT64_MIN does not overflow.
  bool negative = bytes < 0;
  uint64_t magnitude = negative ? ~static_cast<uint64_t>(bytes) + 1 : static_cast<uint64_t>(bytes);
  const char* sign = negative ? "-" : "";
  if (magnitude < 1024) return absl::StrCat(sign, magnitude, " B");
  int unit = 0;
  long double value = magnitude;
  while (value >= 1024 && unit + 1 < static_cast<int>(std::size(kNames))) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%s%.1f %s", sign, static_cast<double>(value), kNames[unit]);
}

}  // namespace lumen
