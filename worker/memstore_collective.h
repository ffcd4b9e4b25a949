// Data-parallel replicas in separate worker processes sum their gradients through the
// memstore (engine::Collective), as a reduce-scatter and an all-gather in the memstore's host
// tier: each step replica r cuts its values into one contiguous shard per replica and writes
// shard k as "<job id>.replicas/run<n>/<step>/<r>/<k>" (n: the job's run, see
// RunTaskRequest.run); replica k adds shard k of every replica in rank order and writes the
// sum as "<job id>.replicas/run<n>/<step>/sum/<k>"; every replica reads the sums. So each
// replica writes and reads about twice its values' bytes a step, however many replicas there
// are, and all get the same bits. Bulk bytes go over the memstore's data plane
// (UCX), never through gRPC.
#ifndef LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_
#define LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/job_tensors.h"
#include "memstore/memstore_client.h"
#include "worker/engine/collective.h"

namespace lumen {

class MemstoreCollective : public engine::Collective {
 public:
  // Replica `rank` of `size` of run `run` of job `job_id`. While waiting for a peer's tensor
  // it polls `cancelled` (CANCELLED when it says so) and gives up after `peer_timeout`
  // (DEADLINE_EXCEEDED naming the replica and the step). `memstore` must outlive it.
  MemstoreCollective(MemstoreClient* memstore, std::string job_id, int64_t run, int rank,
                     int size, std::function<bool()> cancelled,
                     absl::Duration peer_timeout = absl::Minutes(30));

  // Where run `run` of a job's replicas exchange their tensors (the coordinator frees what is
  // left under JobReplicaPrefix, every run's, when a run ends). A run's own prefix: a replica
  // of a stopped run may still write a step's tensors after the run was reclaimed, and the
  // next run, at that step again, must not take them for its peers' (it would free its own
  // part before a peer read it, and both would wait for good).
  static std::string Prefix(const std::string& job_id, int64_t run) {
    return absl::StrCat(JobReplicaPrefix(job_id), "run", run, "/");
  }
  // Host-tier bytes one of `size` replicas holds there at most: a step's parts and its sums
  // of two steps, (size + 1) / size times its values' bytes.
  static int64_t ClaimBytes(int64_t values, int64_t scalars, int size);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status SumAcrossReplicas(int64_t step, absl::Span<float> values,
                                 std::vector<double>* scalars) override;

 private:
  std::string PartId(int64_t step, int rank, int shard) const;
  std::string SumId(int64_t step, int shard) const;
  // Tensor `id` (`what`, e.g. "replica 1's sum", of `step`) into `out` (`bytes` long), waiting
  // until it is written; `own_part_bytes` is the size of the part this replica keeps until the
  // step ends, whose disappearance means the run ended.
  absl::Status Await(const std::string& id, const std::string& what, int64_t step,
                     std::vector<char>* out, int64_t bytes, int64_t own_part_bytes);

  MemstoreClient* const memstore_;
  const std::string job_id_;
  const int64_t run_;
  const int rank_, size_;
  const std::function<bool()> cancelled_;
  const absl::Duration peer_timeout_;
  int64_t last_step_ = -1;  // of the last call, whose sum this replica still holds
};

}  // namespace lumen

#endif  // LUMEN_WORKER_MEMSTORE_COLLECTIVE_H_
