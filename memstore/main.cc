// memstore: the host-RAM and NVMe tiers of the node's memory pool. Started by lumend.
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/metrics.h"
#include "common/process.h"
#include "glog/logging.h"
#include "memstore/service.h"
#include "memstore/tensor_store.h"
#include "memstore/tier_profile.h"
#include "common/profile_cache.h"
#include "memstore/ucx_transport.h"

int main(int argc, char** argv) {
  lumen::InitProcess(argv[0]);
  CLI::App app{"Lumen memstore (started by lumend)"};
  std::string data_dir, socket, metrics_address = "127.0.0.1:0";
  int64_t host_memory = 1 << 30;
  int64_t page_bytes = 64 << 20;
  std::vector<std::string> nvme_dirs;
  app.add_option("--data-dir", data_dir, "Node data directory")->required();
  app.add_option("--socket", socket, "Unix socket of the memstore service")->required();
  app.add_option("--metrics-address", metrics_address, "Prometheus endpoint");
  app.add_option("--host-memory", host_memory, "Host RAM arena in bytes");
  app.add_option("--nvme-dir", nvme_dirs, "DIR[:CAPACITY], repeatable");
  app.add_option("--page-bytes", page_bytes, "NVMe page size in bytes");
  bool reprofile = false;
  app.add_flag("--reprofile", reprofile, "Measure the tiers again instead of using the cache");
  CLI11_PARSE(app, argc, argv);

  lumen::TensorStoreOptions options;
  options.db_path = data_dir + "/db/memstore";
  options.host_bytes = host_memory;
  options.page_bytes = page_bytes;
  options.arena_name = "lumen-memstore";
  for (const std::string& text : nvme_dirs) {
    auto dir = lumen::ParseNvmeDir(text);
    if (!dir.ok()) LOG(FATAL) << dir.status();
    options.nvme_dirs.push_back(*dir);
  }
  lumen::MemstoreServiceOptions service_options;
  auto io = lumen::UringNvmeIo::Create({service_options.io_queue_depth, 1 << 20});
  if (!io.ok()) LOG(FATAL) << io.status();
  // UCX allocates the host tier's memory: on one node, workers can then map it (ucp_rkey_ptr)
  // and copy at memory speed; UCX 1.13 cannot share memory it did not allocate.
  auto ucx = lumen::UcxServer::CreateWithAllocatedRegion(host_memory);
  if (!ucx.ok()) LOG(FATAL) << ucx.status();
  options.host_region = (*ucx)->region();
  auto store = lumen::TensorStore::Open(options, std::move(*io));
  if (!store.ok()) LOG(FATAL) << store.status();
  for (const std::string& id : (*store)->LostTensors()) {
    LOG(WARNING) << "tensor " << id << " was in host memory at the last stop and is lost";
  }
  const lumen::UcxEndpointInfo endpoint = (*ucx)->info();
  lumen::DataPlaneInfo data_plane;
  data_plane.set_worker_address(endpoint.worker_address);
  data_plane.set_rkey(endpoint.rkey);
  data_plane.set_base_address(endpoint.base_address);
  data_plane.set_length(endpoint.length);

  auto profile_io = lumen::UringNvmeIo::Create({service_options.io_queue_depth, 1 << 20});
  if (!profile_io.ok()) LOG(FATAL) << profile_io.status();
  auto profile = lumen::CachedProfile(data_dir, "memstore", reprofile, [&] {
    return lumen::MeasureTiers(options.nvme_dirs, **profile_io);
  });
  if (profile.ok()) {
    service_options.profile = *profile;
  } else {
    LOG(WARNING) << "cannot measure the tiers: " << profile.status();
  }
  auto metrics = lumen::MetricsServer::Create(metrics_address);
  if (!metrics.ok()) LOG(FATAL) << metrics.status();
  lumen::MemstoreService service(store->get(), data_plane, service_options,
                                 (*metrics)->registry());
  auto server = lumen::StartGrpcServer({socket, ""}, {&service}, (*metrics)->registry());
  if (!server.ok()) LOG(FATAL) << server.status();
  LOG(INFO) << "memstore ready: host " << host_memory << " bytes, " << options.nvme_dirs.size()
            << " NVMe directories; metrics on " << (*metrics)->address();

  const int sig = lumen::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": stopping";
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
