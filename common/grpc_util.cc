#include "common/grpc_util.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace lumen {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbers.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string UnixTarget(const std::string& socket_path) {
  return absl::StartsWith(socket_path, "unix:") ? socket_path : absl::StrCat("unix:", socket_path);
}

absl::StatusOr<std::string> LoopbackListenAddress(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos || colon + 1 == host_port.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address '", host_port, "' must be host:port"));
  }
  std::string host = host_port.substr(0, colon);
  if (host == "127.0.0.1" || host == "localhost" || host == "[::1]" || host == "::1") {
    return host == "::1" ? absl::StrCat("[::1]", host_port.substr(colon)) : host_port;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("non-loopback address ", host,
                   " needs TLS support, which Lumen does not have yet; use 127.0.0.1, ::1 or "
                   "localhost (or the Unix socket)"));
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> LocalChannel(const std::string& target) {
  std::string resolved;
  if (absl::StartsWith(target, "unix:") || absl::StartsWith(target, "/")) {
    resolved = UnixTarget(target);
  } else {
    auto address = LoopbackListenAddress(target);
    if (!address.ok()) return address.status();
    resolved = *address;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Reconnect quickly after a restarted peer comes back.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(resolved, grpc::InsecureChannelCredentials(), args);
}

}  // namespace lumen
