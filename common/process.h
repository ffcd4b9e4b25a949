// What every daemon's main() does the same way: logging, the termination signal, the gRPC server
// on a Unix socket (and optionally loopback TCP) with RPC metrics.
#ifndef LUMEN_COMMON_PROCESS_H_
#define LUMEN_COMMON_PROCESS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/server.h"
#include "grpcpp/impl/codegen/service_type.h"
#include "prometheus/registry.h"

namespace lumen {

// glog to stderr (lumend appends each child's stderr to <data_dir>/logs/<name>.log), and
// SIGTERM/SIGINT handlers that wake WaitForTerminationSignal. Call first in main().
void InitProcess(const char* argv0);

// Waits for SIGTERM or SIGINT and returns its number.
int WaitForTerminationSignal();

// Until EndStartup(), SIGTERM or SIGINT ends the process at once with status 0. For startup
// work that publishes nothing and can take longer than lumend waits for a child to stop (a
// worker measuring its device, or waiting for another worker's measurement to finish).
void ExitOnTerminationDuringStartup();
// From here on the signals only wake WaitForTerminationSignal. Call before publishing anything
// (a socket, a file) that must be cleaned up on exit.
void EndStartup();

struct GrpcServerOptions {
  // Unix socket path; a stale file there is removed first. Required.
  std::string socket;
  // Optional "127.0.0.1:PORT" (loopback only).
  std::string listen_tcp;
};

// Builds and starts a server for `services`, counting RPCs into `registry`.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services,
    prometheus::Registry& registry);

}  // namespace lumen

#endif  // LUMEN_COMMON_PROCESS_H_
