// Gathers what `lumenctl cluster` shows: lumend's process table (node.json), each worker's
// device, the memstore's tiers and the job counts. Thread-safe.
#ifndef LUMEN_COORDINATOR_CLUSTER_INFO_H_
#define LUMEN_COORDINATOR_CLUSTER_INFO_H_

#include <string>
#include <vector>

#include "coordinator/job_manager.h"
#include "coordinator/worker_client.h"
#include "memstore/memstore_client.h"
#include "proto/lumen.pb.h"

namespace lumen {

class ClusterInfoCollector {
 public:
  // All pointers must outlive the collector; `memstore` may be null.
  ClusterInfoCollector(std::string data_dir, std::string node_status_file,
                       std::vector<WorkerClient*> workers, MemstoreClient* memstore,
                       JobManager* jobs);

  // Never fails: unreachable peers are reported in the reply.
  GetClusterInfoReply Collect();

 private:
  const std::string data_dir_;
  const std::string node_status_file_;
  const std::vector<WorkerClient*> workers_;
  MemstoreClient* const memstore_;
  JobManager* const jobs_;
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_CLUSTER_INFO_H_
