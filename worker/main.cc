// worker: drives one device and runs the training tasks the coordinator sends. Started by lumend.
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/process.h"
#include "glog/logging.h"
#include "worker/service.h"

int main(int argc, char** argv) {
  lumen::InitProcess(argv[0]);
  CLI::App app{"Lumen worker (started by lumend)"};
  std::string data_dir, socket, metrics_address = "127.0.0.1:0", device = "cpu";
  int id = 0;
  int64_t device_memory = 1 << 30;
  int threads = 0;
  app.add_option("--data-dir", data_dir, "Node data directory")->required();
  app.add_option("--id", id, "Worker index");
  app.add_option("--socket", socket, "Unix socket of the worker service")->required();
  app.add_option("--metrics-address", metrics_address, "Prometheus endpoint");
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--device-memory", device_memory, "Device memory budget in bytes");
  app.add_option("--threads", threads, "CPU kernel threads (0 = all cores)");
  CLI11_PARSE(app, argc, argv);

  if (device == "cuda") {
    LOG(ERROR) << "--device cuda: this build has no CUDA device yet; start lumend with "
                  "--device cpu";
    return 2;
  }
  auto metrics = lumen::MetricsServer::Create(metrics_address);
  if (!metrics.ok()) LOG(FATAL) << metrics.status();
  lumen::WorkerServiceOptions options;
  options.name = absl::StrCat("worker-", id);
  options.device = device;
  options.runner.worker_name = options.name;
  options.runner.num_threads = threads;
  options.runner.device_memory_budget_bytes = device_memory;
  lumen::WorkerService service(options, (*metrics)->registry());
  auto server = lumen::StartGrpcServer({socket, ""}, {&service}, (*metrics)->registry());
  if (!server.ok()) LOG(FATAL) << server.status();
  LOG(INFO) << options.name << " ready (" << device << ", budget " << device_memory
            << " bytes); metrics on " << (*metrics)->address();

  const int sig = lumen::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": stopping";
  service.Shutdown();
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
