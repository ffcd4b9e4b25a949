// The client-facing gRPC service: translates requests to JobManager calls. Thread-safe.
#ifndef LUMEN_COORDINATOR_SERVICE_H_
#define LUMEN_COORDINATOR_SERVICE_H_

#include "coordinator/cluster_info.h"
#include "coordinator/job_manager.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

class LumenService final : public Lumen::CallbackService {
 public:
  // Both must outlive the service.
  LumenService(JobManager* jobs, ClusterInfoCollector* cluster);

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const SubmitJobRequest* request,
                                      SubmitJobReply* reply) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const ListJobsRequest* request,
                                     ListJobsReply* reply) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const GetJobRequest* request, GetJobReply* reply) override;
  grpc::ServerWriteReactor<WatchJobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                    const WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const CancelJobRequest* request,
                                      CancelJobReply* reply) override;
  grpc::ServerUnaryReactor* GetClusterInfo(grpc::CallbackServerContext* context,
                                           const GetClusterInfoRequest* request,
                                           GetClusterInfoReply* reply) override;

 private:
  JobManager* const jobs_;
  ClusterInfoCollector* const cluster_;
};

}  // namespace lumen

#endif  // LUMEN_COORDINATOR_SERVICE_H_
