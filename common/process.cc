#include "common/process.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/metrics.h"
#include "glog/logging.h"
#include "grpcpp/server_builder.h"

namespace lumen {

namespace {

// Written by the signal handler, read by WaitForTerminationSignal. A handler (rather than
// blocking the signals and sigwait) works whichever thread the kernel picks, including threads
// that libraries such as UCX start with their own signal masks.
int signal_pipe[2] = {-1, -1};
std::atomic<bool> exit_on_signal{false};
static_assert(std::atomic<bool>::is_always_lock_free, "read in a signal handler");

void OnTerminationSignal(int sig) {
  if (exit_on_signal.load()) {
    static constexpr char kMessage[] = "termination signal during startup: exiting\n";
    (void)!write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
    _exit(0);
  }
  const int saved = errno;
  const char byte = static_cast<char>(sig);
  (void)!write(signal_pipe[1], &byte, 1);
  errno = saved;
}

}  // namespace

void InitProcess(const char* argv0) {
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv0);
  if (pipe2(signal_pipe, O_CLOEXEC) != 0) PLOG(FATAL) << "pipe2";
  struct sigaction action = {};
  action.sa_handler = OnTerminationSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  char byte = 0;
  while (read(signal_pipe[0], &byte, 1) != 1) {
  }
  return byte;
}

void ExitOnTerminationDuringStartup() {
  exit_on_signal.store(true);
  // A signal that came before this call is still in the pipe.
  char byte = 0;
  const int flags = fcntl(signal_pipe[0], F_GETFL);
  fcntl(signal_pipe[0], F_SETFL, flags | O_NONBLOCK);
  const bool pending = read(signal_pipe[0], &byte, 1) == 1;
  fcntl(signal_pipe[0], F_SETFL, flags);
  if (pending) OnTerminationSignal(byte);
}

void EndStartup() { exit_on_signal.store(false); }

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
