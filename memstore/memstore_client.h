// How other processes reach the memstore's control service. Implementations are thread-safe.
#ifndef LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_
#define LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/lumen.pb.h"

namespace grpc {
class Channel;
}

namespace lumen {

class MemstoreClient {
 public:
  virtual ~MemstoreClient() = default;
  virtual absl::StatusOr<std::vector<TierInfo>> GetStats(absl::Duration timeout) = 0;
};

class GrpcMemstoreClient : public MemstoreClient {
 public:
  explicit GrpcMemstoreClient(const std::string& socket);
  absl::StatusOr<std::vector<TierInfo>> GetStats(absl::Duration timeout) override;

 private:
  std::shared_ptr<grpc::Channel> channel_;
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_
