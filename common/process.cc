#include "common/process.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/metrics.h"
#include "glog/logging.h"
#include "grpcpp/server_builder.h"

namespace lumen {

void InitProcess(const char* argv0) {
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv0);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services,
    prometheus::Registry& registry) {
  if (options.socket.empty()) return absl::InvalidArgumentError("--socket is required");
  if (options.socket.size() >= 108) {
    return absl::InvalidArgumentError(absl::StrCat("socket path ", options.socket, " is ",
                                                   options.socket.size(),
                                                   " bytes; Unix sockets allow at most 107"));
  }
  unlink(options.socket.c_str());
  grpc::ServerBuilder builder;
  builder.AddListeningPort(UnixTarget(options.socket), grpc::InsecureServerCredentials());
  int tcp_port = 0;
  if (!options.listen_tcp.empty()) {
    auto address = LoopbackListenAddress(options.listen_tcp);
    if (!address.ok()) return address.status();
    builder.AddListeningPort(*address, grpc::InsecureServerCredentials(), &tcp_port);
  }
  for (grpc::Service* service : services) builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(RpcMetricsInterceptor(registry));
  builder.experimental().SetInterceptorCreators(std::move(creators));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.socket,
                                               options.listen_tcp.empty() ? "" : " or ",
                                               options.listen_tcp));
  }
  if (!options.listen_tcp.empty() && tcp_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_tcp));
  }
  LOG(INFO) << "serving on " << options.socket
            << (options.listen_tcp.empty() ? "" : absl::StrCat(" and ", options.listen_tcp));
  return server;
}

}  // namespace lumen
