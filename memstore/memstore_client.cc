#include "memstore/memstore_client.h"

#include "common/grpc_util.h"
#include "grpcpp/client_context.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

GrpcMemstoreClient::GrpcMemstoreClient(const std::string& socket)
    : channel_(*LocalChannel(UnixTarget(socket))) {}

absl::StatusOr<std::vector<TierInfo>> GrpcMemstoreClient::GetStats(absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  GetMemstoreStatsReply reply;
  grpc::Status status = Memstore::NewStub(channel_)->GetStats(&context, {}, &reply);
  if (!status.ok()) return FromGrpcStatus(status);
  return std::vector<TierInfo>(reply.tiers().begin(), reply.tiers().end());
}

}  // namespace lumen
