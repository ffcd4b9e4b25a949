#include "memstore/service.h"

#include <sys/statvfs.h>

#include "absl/strings/str_cat.h"
#include "prometheus/gauge.h"

namespace lumen {

MemstoreService::MemstoreService(MemstoreOptions options, prometheus::Registry& registry)
    : options_(std::move(options)) {
  auto& capacity = prometheus::BuildGauge()
                       .Name("lumen_memstore_capacity_bytes")
                       .Help("Bytes the memstore may use, by tier")
                       .Register(registry);
  auto& used = prometheus::BuildGauge()
                   .Name("lumen_memstore_used_bytes")
                   .Help("Bytes the memstore holds, by tier")
                   .Register(registry);
  for (const TierInfo& tier : Tiers()) {
    capacity.Add({{"tier", tier.name()}}).Set(static_cast<double>(tier.capacity_bytes()));
    used.Add({{"tier", tier.name()}}).Set(static_cast<double>(tier.used_bytes()));
  }
}

std::vector<TierInfo> MemstoreService::Tiers() const {
  std::vector<TierInfo> tiers;
  TierInfo host;
  host.set_name("host");
  host.set_capacity_bytes(options_.host_memory_bytes);
  tiers.push_back(host);
  for (const NvmeDir& dir : options_.nvme_dirs) {
    TierInfo nvme;
    nvme.set_name(absl::StrCat("nvme:", dir.path));
    int64_t capacity = dir.capacity_bytes;
    struct statvfs fs;
    if (capacity == 0 && statvfs(dir.path.c_str(), &fs) == 0) {
      capacity = static_cast<int64_t>(fs.f_bavail) * static_cast<int64_t>(fs.f_frsize);
    }
    nvme.set_capacity_bytes(capacity);
    tiers.push_back(nvme);
  }
  return tiers;
}

grpc::ServerUnaryReactor* MemstoreService::GetStats(grpc::CallbackServerContext* context,
                                                    const GetMemstoreStatsRequest* request,
                                                    GetMemstoreStatsReply* reply) {
  for (const TierInfo& tier : Tiers()) *reply->add_tiers() = tier;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace lumen
