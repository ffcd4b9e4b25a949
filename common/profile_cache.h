// Measured hardware figures cached in the node's data directory, so a restarted process does
// not measure again: <data-dir>/profile/<name>.json holds one flat JSON object of numbers.
// Thread-compatible.
#ifndef LUMEN_COMMON_PROFILE_CACHE_H_
#define LUMEN_COMMON_PROFILE_CACHE_H_

#include <functional>
#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace lumen {

using ProfileFigures = std::map<std::string, double>;

// Returns the cached figures of `name` under `data_dir`, or runs `measure`, stores its result
// (atomically) and returns it. A cache that cannot be parsed is measured again. `remeasure`
// ignores the cache. Measurements of one data directory's processes run one at a time (an
// flock on <data-dir>/profile/.measuring), so the workers and the memstore, all measuring at
// a node's first start, do not slow each other's figures down.
// True when `name` has cached figures under `data_dir` (CachedProfile would not measure).
bool HasCachedProfile(const std::string& data_dir, const std::string& name);

absl::StatusOr<ProfileFigures> CachedProfile(
    const std::string& data_dir, const std::string& name, bool remeasure,
    const std::function<absl::StatusOr<ProfileFigures>()>& measure);

}  // namespace lumen

#endif  // LUMEN_COMMON_PROFILE_CACHE_H_
