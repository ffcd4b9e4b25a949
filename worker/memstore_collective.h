// Data-parallel replicas in separate worker processes sum their gradients through the
// memstore (engine::Collective): each step every replica writes its values as one tensor,
// "<job id>.replicas/<step>/<rank>", in the memstore's host tier, reads the others' as they
// appear, and adds them all in rank order. Bulk bytes go over the memstore's data plane (UCX),
// never through gRPC.
#ifndef LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_
#define LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/job_tensors.h"
#include "memstore/memstore_client.h"
#include "worker/engine/collective.h"

namespace lumen {

class MemstoreCollective : public engine::Collective {
 public:
  // Replica `rank` of `size` of job `job_id`. While waiting for a peer's tensor it polls
  // `cancelled` (CANCELLED when it says so) and gives up after `peer_timeout`
  // (DEADLINE_EXCEEDED naming the replica and the step). `memstore` must outlive it.
  MemstoreCollective(MemstoreClient* memstore, std::string job_id, int rank, int size,
                     std::function<bool()> cancelled,
                     absl::Duration peer_timeout = absl::Minutes(30));

  // Where a job's replicas exchange their tensors (the coordinator frees what is left there
  // when the job ends).
  static std::string Prefix(const std::string& job_id) { return JobReplicaPrefix(job_id); }
  // Host-tier bytes one replica holds there at most: its last two steps' tensors.
  static int64_t ClaimBytes(int64_t values, int64_t scalars);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status SumAcrossReplicas(int64_t step, std::vector<float>* values,
                                 std::vector<double>* scalars) override;

 private:
  std::string Id(int64_t step, int rank) const;
  // Replica `rank`'s tensor of `step` into `out` (`bytes` long), waiting until it is written.
  absl::Status Await(int64_t step, int rank, std::vector<char>* out, int64_t bytes);

  MemstoreClient* const memstore_;
  const std::string job_id_;
  const int rank_, size_;
  const std::function<bool()> cancelled_;
  const absl::Duration peer_timeout_;
};

}  // namespace lumen

#endif  // LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_
