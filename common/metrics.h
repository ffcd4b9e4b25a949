// A Prometheus endpoint on loopback and the gRPC server interceptor that counts RPCs by method
// and code with their latency. MetricsServer is thread-safe.
//
// The endpoint is a minimal HTTP/1.1 server of our own on one thread, not prometheus-cpp's
// civetweb Exposer: civetweb runs its threads on 100 KiB stacks, and in a process that loads
// OpenBLAS (whose libquadmath registers a printf extension, which sends every printf down
// glibc's stack-hungry positional path) its threads overflow them and crash.
#ifndef LUMEN_COMMON_METRICS_H_
#define LUMEN_COMMON_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/support/server_interceptor.h"
#include <atomic>
#include <thread>

#include "prometheus/registry.h"

namespace lumen {

class MetricsServer {
 public:
  // Serves /metrics on `address` ("127.0.0.1:PORT"; port 0 picks one). Only loopback addresses
  // are accepted.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Create(const std::string& address);
  // Stops serving (at most ~100 ms).
  ~MetricsServer();

  prometheus::Registry& registry() { return *registry_; }
  const std::shared_ptr<prometheus::Registry>& shared_registry() const { return registry_; }
  // "127.0.0.1:PORT" actually bound.
  const std::string& address() const { return address_; }

 private:
  MetricsServer() = default;
  void Serve();
  void Answer(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  std::string address_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Counts every RPC as lumen_rpc_requests_total{method,code} and observes
// lumen_rpc_duration_seconds{method}. Install with ServerBuilder::experimental()
// .SetInterceptorCreators.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> RpcMetricsInterceptor(
    prometheus::Registry& registry);

}  // namespace lumen

#endif  // LUMEN_COMMON_METRICS_H_
