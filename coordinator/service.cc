#include "coordinator/service.h"

#include <deque>
#include <memory>

#include "common/grpc_util.h"
#include "common/stream_reactor.h"

namespace lumen {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// Streams the events of one JobManager watch.
class WatchReactor : public StreamReactor<WatchJobEvent> {
 public:
  WatchReactor(JobManager* jobs, const WatchJobRequest& request) : jobs_(jobs) {
    std::shared_ptr<Outlet> out = outlet();
    auto handle = jobs->Watch(request.job_id(), request.follow(),
                              [out](const WatchJobEvent& event, bool done) {
                                out->Push(event);
                                if (done) out->Close(grpc::Status::OK);
                              });
    if (!handle.ok()) {
      out->Close(ToGrpcStatus(handle.status()));
    } else {
      handle_ = *handle;
    }
  }

 private:
  void OnStreamDone() override {
    if (handle_ != 0) jobs_->Unwatch(handle_);
  }

  JobManager* const jobs_;
  // Set in the constructor, which gRPC runs to completion before any reaction.
  int64_t handle_ = 0;
};

}  // namespace

LumenService::LumenService(JobManager* jobs, ClusterInfoCollector* cluster)
    : jobs_(jobs), cluster_(cluster) {}

grpc::ServerUnaryReactor* LumenService::SubmitJob(grpc::CallbackServerContext* context,
                                                  const SubmitJobRequest* request,
                                                  SubmitJobReply* reply) {
  auto job = jobs_->Submit(request->spec_yaml(), request->base_dir());
  if (job.ok()) *reply->mutable_job() = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerUnaryReactor* LumenService::ListJobs(grpc::CallbackServerContext* context,
                                                 const ListJobsRequest* request,
                                                 ListJobsReply* reply) {
  for (Job& job : jobs_->List()) *reply->add_jobs() = std::move(job);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* LumenService::GetJob(grpc::CallbackServerContext* context,
                                               const GetJobRequest* request, GetJobReply* reply) {
  auto job = jobs_->Get(request->job_id());
  if (job.ok()) *reply->mutable_job() = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerWriteReactor<WatchJobEvent>* LumenService::WatchJob(
    grpc::CallbackServerContext* context, const WatchJobRequest* request) {
  return new WatchReactor(jobs_, *request);
}

grpc::ServerUnaryReactor* LumenService::CancelJob(grpc::CallbackServerContext* context,
                                                  const CancelJobRequest* request,
                                                  CancelJobReply* reply) {
  auto job = jobs_->Cancel(request->job_id());
  if (job.ok()) *reply->mutable_job() = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerUnaryReactor* LumenService::GetClusterInfo(grpc::CallbackServerContext* context,
                                                       const GetClusterInfoRequest* request,
                                                       GetClusterInfoReply* reply) {
  *reply = cluster_->Collect();
  return Done(context, absl::OkStatus());
}

}  // namespace lumen
