// The memstore's control service. This version reports the tiers it was given (host RAM budget
// and NVMe directories); storing pages in them is the memstore issue's work. Thread-safe.
#ifndef LUMEN_MEMSTORE_SERVICE_H_
#define LUMEN_MEMSTORE_SERVICE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/node_options.h"
#include "prometheus/registry.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

struct MemstoreOptions {
  int64_t host_memory_bytes = 0;
  std::vector<NvmeDir> nvme_dirs;
};

class MemstoreService final : public Memstore::CallbackService {
 public:
  // Exports lumen_memstore_capacity_bytes / lumen_memstore_used_bytes{tier} into `registry`.
  MemstoreService(MemstoreOptions options, prometheus::Registry& registry);

  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const GetMemstoreStatsRequest* request,
                                     GetMemstoreStatsReply* reply) override;

  std::vector<TierInfo> Tiers() const;

 private:
  const MemstoreOptions options_;
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_SERVICE_H_
