// memstore: the host-RAM and NVMe tiers of the node's memory pool. Started by lumend.
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/metrics.h"
#include "common/process.h"
#include "glog/logging.h"
#include "memstore/service.h"

int main(int argc, char** argv) {
  lumen::InitProcess(argv[0]);
  CLI::App app{"Lumen memstore (started by lumend)"};
  std::string data_dir, socket, metrics_address = "127.0.0.1:0";
  int64_t host_memory = 1 << 30;
  std::vector<std::string> nvme_dirs;
  app.add_option("--data-dir", data_dir, "Node data directory")->required();
  app.add_option("--socket", socket, "Unix socket of the memstore service")->required();
  app.add_option("--metrics-address", metrics_address, "Prometheus endpoint");
  app.add_option("--host-memory", host_memory, "Host RAM budget in bytes");
  app.add_option("--nvme-dir", nvme_dirs, "DIR[:CAPACITY], repeatable");
  CLI11_PARSE(app, argc, argv);

  lumen::MemstoreOptions options;
  options.host_memory_bytes = host_memory;
  for (const std::string& text : nvme_dirs) {
    auto dir = lumen::ParseNvmeDir(text);
    if (!dir.ok()) LOG(FATAL) << dir.status();
    options.nvme_dirs.push_back(*dir);
  }
  auto metrics = lumen::MetricsServer::Create(metrics_address);
  if (!metrics.ok()) LOG(FATAL) << metrics.status();
  lumen::MemstoreService service(options, (*metrics)->registry());
  auto server = lumen::StartGrpcServer({socket, ""}, {&service}, (*metrics)->registry());
  if (!server.ok()) LOG(FATAL) << server.status();
  LOG(INFO) << "memstore ready; metrics on " << (*metrics)->address();

  const int sig = lumen::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": stopping";
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
