// The one mapping between absl::Status and grpc::Status, and the rule for server addresses.
#ifndef LUMEN_COMMON_GRPC_UTIL_H_
#define LUMEN_COMMON_GRPC_UTIL_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "grpcpp/support/status.h"

namespace lumen {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// gRPC target for a Unix socket path ("unix:/path").
std::string UnixTarget(const std::string& socket_path);

// Checks that a TCP listen address ("host:port") is on loopback: anything else needs TLS, which
// is not built yet. Returns the address in gRPC's form.
absl::StatusOr<std::string> LoopbackListenAddress(const std::string& host_port);

// An insecure channel to a Unix socket or loopback TCP address (refuses any other address).
absl::StatusOr<std::shared_ptr<grpc::Channel>> LocalChannel(const std::string& target);

}  // namespace lumen

#endif  // LUMEN_COMMON_GRPC_UTIL_H_
