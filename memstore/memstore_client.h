// How other processes use the memstore: control over gRPC, tensor bytes over UCX (never
// through gRPC). An interface, so code that uses the memstore is tested with the fake.
// Implementations are thread-safe.
#ifndef LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_
#define LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/lumen.pb.h"

namespace grpc {
class Channel;
}

namespace lumen {

class UcxClient;

class MemstoreClient {
 public:
  virtual ~MemstoreClient() = default;
  // Tiers, tensor counts and the tensors lost in a restart.
  virtual absl::StatusOr<GetMemstoreStatsReply> GetStats(absl::Duration timeout) = 0;
  // Creates or replaces tensor `id` with `size` bytes from `data` in `tier`.
  virtual absl::Status Write(const std::string& id, const void* data, int64_t size,
                             const std::string& dtype, Tier tier) = 0;
  // Copies tensor `id` into `dst` and returns its size (errors as TensorStore::Read).
  virtual absl::StatusOr<int64_t> Read(const std::string& id, void* dst, int64_t capacity) = 0;
  virtual absl::Status Move(const std::string& id, Tier tier) = 0;
  virtual absl::Status Free(const std::string& id) = 0;
  // Frees every tensor whose id starts with `prefix`, dropping the pins and unfinished writes
  // on them (MemstoreService::FreeTensors): for tensors whose owner is gone. Fails after
  // `timeout` (a memstore that is stopping may not answer).
  virtual absl::StatusOr<FreeTensorsReply> FreeTensors(const std::string& prefix,
                                                       absl::Duration timeout) = 0;
};

// The memstore process at a Unix socket; the UCX connection is made on first use.
class GrpcMemstoreClient : public MemstoreClient {
 public:
  explicit GrpcMemstoreClient(const std::string& socket);
  ~GrpcMemstoreClient() override;
  absl::StatusOr<GetMemstoreStatsReply> GetStats(absl::Duration timeout) override;
  absl::Status Write(const std::string& id, const void* data, int64_t size,
                     const std::string& dtype, Tier tier) override;
  absl::StatusOr<int64_t> Read(const std::string& id, void* dst, int64_t capacity) override;
  absl::Status Move(const std::string& id, Tier tier) override;
  absl::Status Free(const std::string& id) override;
  absl::StatusOr<FreeTensorsReply> FreeTensors(const std::string& prefix,
                                               absl::Duration timeout) override;

 private:
  absl::Status EnsureDataPlane() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_);

  std::shared_ptr<grpc::Channel> channel_;
  absl::Mutex ucx_mu_;  // UcxClient is not thread-safe.
  std::unique_ptr<UcxClient> ucx_ ABSL_GUARDED_BY(ucx_mu_);
};

// The capacity of the memstore's host tier and of its NVMe tiers together, from its stats.
struct TierCapacity {
  int64_t host_bytes = 0;
  int64_t nvme_bytes = 0;
};
TierCapacity TierCapacityOf(const GetMemstoreStatsReply& stats);

// In-memory stand-in with the same semantics (tiers are recorded, not simulated).
class FakeMemstoreClient : public MemstoreClient {
 public:
  absl::StatusOr<GetMemstoreStatsReply> GetStats(absl::Duration timeout) override;
  absl::Status Write(const std::string& id, const void* data, int64_t size,
                     const std::string& dtype, Tier tier) override;
  absl::StatusOr<int64_t> Read(const std::string& id, void* dst, int64_t capacity) override;
  absl::Status Move(const std::string& id, Tier tier) override;
  absl::Status Free(const std::string& id) override;
  absl::StatusOr<FreeTensorsReply> FreeTensors(const std::string& prefix,
                                               absl::Duration timeout) override;

 private:
  struct Tensor {
    std::string bytes;
    Tier tier;
  };
  absl::Mutex mu_;
  std::map<std::string, Tensor> tensors_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_MEMSTORE_CLIENT_H_
