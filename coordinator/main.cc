// coordinator: the job queue, job state in RocksDB and the client service. Started by lumend.
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "common/metrics.h"
#include "common/process.h"
#include "coordinator/cluster_info.h"
#include "coordinator/job_manager.h"
#include "coordinator/planner/predict.h"
#include "coordinator/job_store.h"
#include "coordinator/service.h"
#include "coordinator/worker_client.h"
#include "glog/logging.h"
#include "memstore/memstore_client.h"

int main(int argc, char** argv) {
  lumen::InitProcess(argv[0]);
  CLI::App app{"Lumen coordinator (started by lumend)"};
  std::string data_dir, socket, listen, metrics_address = "127.0.0.1:0", worker_sockets,
                                            memstore_socket, node_status, device = "cpu";
  app.add_option("--data-dir", data_dir, "Node data directory")->required();
  app.add_option("--socket", socket, "Unix socket for clients")->required();
  app.add_option("--listen", listen, "Optional loopback TCP address for clients");
  app.add_option("--metrics-address", metrics_address, "Prometheus endpoint");
  app.add_option("--worker-sockets", worker_sockets, "Comma-separated worker sockets")->required();
  app.add_option("--memstore-socket", memstore_socket, "Memstore socket");
  app.add_option("--node-status", node_status, "lumend's node.json");
  app.add_option("--device", device, "The workers' device, cpu or cuda: jobs' default precision "
                 "and the precisions they accept")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);

  auto metrics = lumen::MetricsServer::Create(metrics_address);
  if (!metrics.ok()) LOG(FATAL) << metrics.status();
  std::error_code ec;
  std::filesystem::create_directories(data_dir + "/db", ec);
  auto store = lumen::RocksDbJobStore::Open(data_dir + "/db/coordinator");
  if (!store.ok()) LOG(FATAL) << store.status();

  std::vector<std::unique_ptr<lumen::GrpcWorkerClient>> worker_clients;
  std::vector<lumen::WorkerClient*> workers;
  for (const std::string& path : std::vector<std::string>(absl::StrSplit(worker_sockets, ',', absl::SkipEmpty()))) {
    worker_clients.push_back(std::make_unique<lumen::GrpcWorkerClient>(
        "worker-" + std::to_string(workers.size()), path, absl::Seconds(30)));
    workers.push_back(worker_clients.back().get());
  }
  if (workers.empty()) LOG(FATAL) << "--worker-sockets names no worker";
  std::unique_ptr<lumen::GrpcMemstoreClient> memstore;
  if (!memstore_socket.empty()) {
    memstore = std::make_unique<lumen::GrpcMemstoreClient>(memstore_socket);
  }

  lumen::JobManagerOptions options;
  options.data_dir = data_dir;
  options.limits.workers = static_cast<int64_t>(workers.size());
  options.limits.has_cuda = device == "cuda";
  lumen::JobManager jobs((*store).get(), workers, options, (*metrics)->registry());
  lumen::ClusterInfoCollector cluster(data_dir, node_status, workers, memstore.get(), &jobs);
  jobs.SetMemstore(memstore.get());
  jobs.SetJobPlanner([&cluster](const lumen::JobSpec& spec) {
    return lumen::PlanJobOnNode(spec, cluster.Collect());
  });
  if (absl::Status s = jobs.Start(); !s.ok()) LOG(FATAL) << s;
  lumen::LumenService service(&jobs, &cluster);
  auto server = lumen::StartGrpcServer({socket, listen}, {&service}, (*metrics)->registry());
  if (!server.ok()) LOG(FATAL) << server.status();
  LOG(INFO) << "coordinator ready; metrics on " << (*metrics)->address();

  const int sig = lumen::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": stopping";
  jobs.Stop();
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
