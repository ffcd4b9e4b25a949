// Measures the memstore's tiers as the planner needs them (DESIGN §3): host-memory copy
// bandwidth, each NVMe directory's sequential write and read bandwidth through the tier's own
// I/O path, and the CPU AdamW rate. Takes a few seconds; cache the result
// (common/profile_cache).
#ifndef LUMEN_MEMSTORE_TIER_PROFILE_H_
#define LUMEN_MEMSTORE_TIER_PROFILE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "common/node_options.h"
#include "common/profile_cache.h"
#include "memstore/nvme_io.h"

namespace lumen {

// Figures: "host_copy_bytes_per_s", "optimizer_params_per_s" (one thread), and per directory i
// (in --nvme-dir order) "nvme<i>_write_bytes_per_s" and "nvme<i>_read_bytes_per_s" (64 MiB,
// O_DIRECT where allowed; the test file is removed).
absl::StatusOr<ProfileFigures> MeasureTiers(const std::vector<NvmeDir>& dirs, NvmeIo& io);

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_TIER_PROFILE_H_
