// worker: drives one device and runs the training tasks the coordinator sends. Started by lumend.
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "common/cpus.h"
#include "common/metrics.h"
#include "common/process.h"
#include "glog/logging.h"
#include "worker/cuda_jobs.h"
#include "worker/device_profile.h"
#include "worker/service.h"
#include "memstore/memstore_client.h"
#include "common/profile_cache.h"

int main(int argc, char** argv) {
  lumen::InitProcess(argv[0]);
  CLI::App app{"Lumen worker (started by lumend)"};
  std::string data_dir, socket, metrics_address = "127.0.0.1:0", device = "cpu";
  int id = 0;
  int64_t device_memory = 1 << 30;
  int threads = 0;
  app.add_option("--data-dir", data_dir, "Node data directory");
  app.add_option("--id", id, "Worker index (with --device cuda, the GPU it drives)");
  app.add_option("--socket", socket, "Unix socket of the worker service");
  app.add_option("--metrics-address", metrics_address, "Prometheus endpoint");
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--device-memory", device_memory,
                 "Device memory budget in bytes (with --device cuda, 0 = the GPU's free memory "
                 "less 1 GiB)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads,
                 "The CPU device's kernel threads, or a GPU worker's host AdamW threads (0 = "
                 "every CPU this process may use)");
  std::string memstore_socket, optimizer_state_tier = "host";
  app.add_option("--memstore-socket", memstore_socket,
                 "The memstore, where jobs larger than --device-memory keep their tensors (on "
                 "a GPU worker, only their AdamW moments, with --optimizer-state-tier nvme)");
  app.add_option("--optimizer-state-tier", optimizer_state_tier,
                 "Memstore tier of offloaded Adam state (on a GPU worker: host keeps a streamed "
                 "job's moments in this process, nvme in the memstore's NVMe tier)")
      ->check(CLI::IsMember({"host", "nvme"}));
  std::string optimizer_overlap = "forward";
  app.add_option("--optimizer-overlap", optimizer_overlap,
                 "When offloaded jobs run AdamW on the host: during the next step's forward or "
                 "during the backward (on a GPU worker: speculatively, for jobs that clip, with "
                 "the moments in this process)")
      ->check(CLI::IsMember({"forward", "backward"}));
  double link_gbps = 0;
  app.add_option("--link-gbps", link_gbps,
                 "Link model: host<->device GB/s per direction for offloaded tensors (0 = off)")
      ->check(CLI::NonNegativeNumber);
  bool reprofile = false;
  app.add_flag("--reprofile", reprofile, "Measure the device again instead of using the cache");
  bool probe = false;
  app.add_flag("--probe", probe,
               "Print the device this worker would drive and exit: 0 when it can be used, 1 "
               "(saying why) when not. lumend runs this before starting CUDA workers");
  CLI11_PARSE(app, argc, argv);
  const bool cuda = device == "cuda";
  std::string device_description = "cpu";
  if (cuda) {
    absl::StatusOr<lumen::CudaDeviceInfo> gpu = lumen::ProbeCudaDevice(id, device_memory);
    if (!gpu.ok()) {
      std::cerr << (probe ? "" : absl::StrCat("worker-", id, ": ")) << gpu.status().message()
                << std::endl;
      return probe ? 1 : 2;
    }
    device_description = gpu->description;
    device_memory = gpu->budget_bytes;
  } else if (device_memory <= 0) {
    std::cerr << "--device-memory must be greater than zero on the CPU device" << std::endl;
    return probe ? 1 : 2;
  }
  if (probe) {
    std::cout << device_description << ", budget " << device_memory << " bytes" << std::endl;
    return 0;
  }
  if (data_dir.empty() || socket.empty()) {
    std::cerr << "--data-dir and --socket are required" << std::endl;
    return 2;
  }
  // Measuring below can outlast lumend's stop timeout (and waits for other workers' turns);
  // nothing it does needs cleaning up, so a stop during it simply exits.
  lumen::ExitOnTerminationDuringStartup();

  auto metrics = lumen::MetricsServer::Create(metrics_address);
  if (!metrics.ok()) LOG(FATAL) << metrics.status();
  lumen::WorkerServiceOptions options;
  options.name = absl::StrCat("worker-", id);
  options.device = device;
  if (cuda) options.device_name = device_description;
  options.runner.worker_name = options.name;
  options.runner.device = cuda ? lumen::DeviceKind::kCuda : lumen::DeviceKind::kCpu;
  options.runner.device_index = id;
  options.runner.num_threads = threads;
  options.runner.device_memory_budget_bytes = device_memory;
  std::unique_ptr<lumen::GrpcMemstoreClient> memstore;
  if (!memstore_socket.empty()) {
    memstore = std::make_unique<lumen::GrpcMemstoreClient>(memstore_socket);
    options.runner.memstore = memstore.get();
  }
  // Measure once the memstore serves: at a node's first start it measures its tiers and
  // pre-faults its host arena, which would take a core from the measurement. (Waiting here,
  // not inside CachedProfile, which holds the node's measuring lock the memstore needs.)
  bool memstore_up = false;
  if (memstore != nullptr && (reprofile || !lumen::HasCachedProfile(data_dir, options.name))) {
    auto stats = memstore->GetStats(absl::Seconds(60));
    memstore_up = stats.ok();
    if (!memstore_up) {
      LOG(WARNING) << "measuring without waiting for the memstore: " << stats.status();
    }
  }
  auto profile = lumen::CachedProfile(data_dir, options.name, reprofile, [&] {
    auto figures =
        cuda ? lumen::MeasureCudaDevice(id)
             : lumen::MeasureCpuDevice(threads > 0 ? threads : lumen::UsableCpus());
    if (figures.ok() && memstore_up) {
      auto call = lumen::MeasureMemstoreCall(memstore.get(), options.name);
      if (call.ok()) {
        figures->insert(call->begin(), call->end());
      } else {
        LOG(WARNING) << "cannot measure a memstore call: " << call.status();
      }
    }
    return figures;
  });
  if (profile.ok()) {
    options.profile = *profile;
    if (cuda) {
      LOG(INFO) << "device: " << device_description << ", "
                << (*profile)["bf16_gemm_flops"] / 1e12 << " TFLOP/s bf16 GEMM, "
                << (*profile)["h2d_bytes_per_s"] / 1e9 << " GB/s host->device";
    } else {
      LOG(INFO) << "device: " << (*profile)["fp32_gemm_flops"] / 1e9 << " GFLOP/s fp32 GEMM, "
                << (*profile)["copy_bytes_per_s"] / 1e9 << " GB/s copies";
    }
  } else {
    LOG(WARNING) << "cannot measure the device: " << profile.status();
  }
  options.runner.optimizer_state_tier =
      optimizer_state_tier == "nvme" ? lumen::engine::HomeTier::kNvme : lumen::engine::HomeTier::kHost;
  options.runner.link_bytes_per_s = link_gbps * 1e9;
  options.runner.optimizer_overlaps_backward = optimizer_overlap == "backward";
  lumen::EndStartup();
  lumen::WorkerService service(options, (*metrics)->registry());
  auto server = lumen::StartGrpcServer({socket, ""}, {&service}, (*metrics)->registry());
  if (!server.ok()) LOG(FATAL) << server.status();
  LOG(INFO) << options.name << " ready (" << device_description << ", budget " << device_memory
            << " bytes); metrics on " << (*metrics)->address();

  const int sig = lumen::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": stopping";
  service.Shutdown();
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
