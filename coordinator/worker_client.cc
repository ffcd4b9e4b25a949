#include "coordinator/worker_client.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

GrpcWorkerClient::GrpcWorkerClient(std::string name, const std::string& socket,
                                   absl::Duration connect_timeout)
    : name_(std::move(name)), socket_(socket), connect_timeout_(connect_timeout) {
  channel_ = *LocalChannel(UnixTarget(socket));  // Unix targets are always accepted.
}

GrpcWorkerClient::~GrpcWorkerClient() = default;

absl::Status GrpcWorkerClient::RunTask(const RunTaskRequest& request,
                                       const std::function<void(const TaskEvent&)>& on_event) {
  // Wait for a (re)starting worker in short slices, so that a cancellation (or the coordinator
  // stopping) is noticed at once rather than after the whole connect timeout.
  const absl::Time connect_deadline = absl::Now() + connect_timeout_;
  while (!channel_->WaitForConnected(absl::ToChronoTime(
      std::min(connect_deadline, absl::Now() + absl::Milliseconds(100))))) {
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_job_ == request.job_id()) return absl::CancelledError("cancelled");
    }
    if (absl::Now() >= connect_deadline) {
      return absl::UnavailableError(absl::StrCat(name_, " did not accept connections at ",
                                                 socket_, " within ",
                                                 absl::FormatDuration(connect_timeout_)));
    }
  }
  // A worker still stopping a cancelled task (for example one whose coordinator died) refuses
  // with ABORTED before starting anything; retry that until the connect timeout.
  const absl::Time give_up = absl::Now() + connect_timeout_;
  grpc::Status status;
  while (true) {
    grpc::ClientContext context;
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_job_ == request.job_id()) return absl::CancelledError("cancelled");
      running_ = &context;
      running_job_ = request.job_id();
    }
    auto stub = Worker::NewStub(channel_);
    std::unique_ptr<grpc::ClientReader<TaskEvent>> reader = stub->RunTask(&context, request);
    TaskEvent event;
    int64_t events = 0;
    while (reader->Read(&event)) {
      ++events;
      on_event(event);
    }
    status = reader->Finish();
    {
      absl::MutexLock lock(&mu_);
      running_ = nullptr;
      running_job_.clear();
    }
    if (status.error_code() != grpc::StatusCode::ABORTED || events > 0 || absl::Now() > give_up) {
      break;
    }
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_job_ == request.job_id()) break;
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  bool cancelled;
  {
    absl::MutexLock lock(&mu_);
    cancelled = cancelled_job_ == request.job_id();
  }
  if (cancelled) {
    AwaitTaskStopped(request.job_id(), connect_timeout_);
    return absl::CancelledError("cancelled");
  }
  if (status.ok()) return absl::OkStatus();
  absl::Status result = FromGrpcStatus(status);
  return absl::Status(result.code(), absl::StrCat(name_, " failed: ", result.message()));
}

void WorkerClient::AwaitTaskStopped(const std::string& job_id, absl::Duration timeout) {
  const absl::Time start = absl::Now();
  while (true) {
    absl::StatusOr<WorkerInfo> info = GetInfo(absl::Seconds(1));
    if (!info.ok() || info->running_job() != job_id) break;  // stopped, or the worker is gone
    if (absl::Now() - start > timeout) {
      LOG(WARNING) << name() << " still runs a task of " << job_id << " after "
                   << absl::FormatDuration(timeout) << "; not waiting longer";
      return;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  const absl::Duration waited = absl::Now() - start;
  if (waited > absl::Seconds(1)) {
    LOG(INFO) << name() << " stopped its task of " << job_id << " after "
              << absl::FormatDuration(waited);
  }
}

void GrpcWorkerClient::CancelTask(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  cancelled_job_ = job_id;
  if (running_ != nullptr && running_job_ == job_id) running_->TryCancel();
}

void GrpcWorkerClient::ForgetCancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  if (cancelled_job_ == job_id) cancelled_job_.clear();
}

absl::StatusOr<WorkerInfo> GrpcWorkerClient::GetInfo(absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  WorkerInfo info;
  grpc::Status status = Worker::NewStub(channel_)->GetWorkerInfo(&context, {}, &info);
  if (!status.ok()) return FromGrpcStatus(status);
  return info;
}

absl::StatusOr<ResourceClaims> GrpcWorkerClient::CheckTask(const JobSpec& spec,
                                                           int64_t host_available_bytes,
                                                           absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  // A worker that is still starting (measuring its device) answers within the timeout.
  context.set_wait_for_ready(true);
  CheckTaskRequest request;
  *request.mutable_spec() = spec;
  request.set_host_available_bytes(host_available_bytes);
  CheckTaskReply reply;
  RETURN_IF_ERROR(FromGrpcStatus(Worker::NewStub(channel_)->CheckTask(&context, request, &reply)));
  return reply.claims();
}

}  // namespace lumen
