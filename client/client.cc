#include "client/client.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "grpcpp/client_context.h"

namespace lumen {
namespace {

constexpr int kUnaryDeadlineSeconds = 30;

void SetDeadline(grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::seconds(kUnaryDeadlineSeconds));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LumenClient>> LumenClient::Connect(const std::string& target) {
  auto channel = LocalChannel(target);
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<LumenClient>(new LumenClient(target, Lumen::NewStub(*channel)));
}

LumenClient::LumenClient(std::string target, std::unique_ptr<Lumen::Stub> stub)
    : target_(std::move(target)), stub_(std::move(stub)) {}

absl::Status LumenClient::Explain(const grpc::Status& status) const {
  absl::Status result = FromGrpcStatus(status);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::UnavailableError(absl::StrCat("cannot reach lumend at ", target_, " (",
                                               status.error_message(),
                                               "); is it running? Start it with `lumend`"));
  }
  return result;
}

absl::StatusOr<Job> LumenClient::Submit(const std::string& spec_yaml, const std::string& base_dir) {
  grpc::ClientContext context;
  SetDeadline(&context);
  SubmitJobRequest request;
  request.set_spec_yaml(spec_yaml);
  request.set_base_dir(base_dir);
  SubmitJobReply reply;
  grpc::Status status = stub_->SubmitJob(&context, request, &reply);
  if (!status.ok()) return Explain(status);
  return reply.job();
}

absl::StatusOr<std::vector<Job>> LumenClient::List() {
  grpc::ClientContext context;
  SetDeadline(&context);
  ListJobsReply reply;
  grpc::Status status = stub_->ListJobs(&context, {}, &reply);
  if (!status.ok()) return Explain(status);
  return std::vector<Job>(reply.jobs().begin(), reply.jobs().end());
}

absl::StatusOr<Job> LumenClient::Get(const std::string& job_id) {
  grpc::ClientContext context;
  SetDeadline(&context);
  GetJobRequest request;
  request.set_job_id(job_id);
  GetJobReply reply;
  grpc::Status status = stub_->GetJob(&context, request, &reply);
  if (!status.ok()) return Explain(status);
  return reply.job();
}

absl::StatusOr<Job> LumenClient::Cancel(const std::string& job_id) {
  grpc::ClientContext context;
  SetDeadline(&context);
  CancelJobRequest request;
  request.set_job_id(job_id);
  CancelJobReply reply;
  grpc::Status status = stub_->CancelJob(&context, request, &reply);
  if (!status.ok()) return Explain(status);
  return reply.job();
}

absl::StatusOr<GetClusterInfoReply> LumenClient::ClusterInfo() {
  grpc::ClientContext context;
  SetDeadline(&context);
  GetClusterInfoReply reply;
  grpc::Status status = stub_->GetClusterInfo(&context, {}, &reply);
  if (!status.ok()) return Explain(status);
  return reply;
}

absl::Status LumenClient::Watch(const std::string& job_id, bool follow,
                                const std::function<void(const WatchJobEvent&)>& on_event) {
  grpc::ClientContext context;
  WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_follow(follow);
  auto reader = stub_->WatchJob(&context, request);
  WatchJobEvent event;
  while (reader->Read(&event)) on_event(event);
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Explain(status);
  return absl::OkStatus();
}

}  // namespace lumen
