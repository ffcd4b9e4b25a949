#include "worker/service.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/stream_reactor.h"
#include "glog/logging.h"

namespace lumen {

// Runs the task on its own thread and streams its events. The thread outlives the call when
// the call is cancelled (the task sees that between steps, and may be inside a memstore call):
// the worker stays busy until the thread ends, not until the stream does. A reactor must not
// wait for it: gRPC runs reactions on its own threads, which the task's calls to the memstore
// may need to complete.
class RunTaskReactor : public StreamReactor<TaskEvent> {
 public:
  RunTaskReactor(const RunTaskRequest& request, WorkerService* service) {
    std::shared_ptr<Outlet> out = outlet();
    service->busy_gauge_.Set(1);
    std::thread([request, service, out] {
      LOG(INFO) << request.job_id() << ": started";
      absl::Status status = lumen::RunTask(
          request, service->options_.runner,
          [&out](const TaskEvent& event) { out->Push(event); },
          [&out, service] { return out->cancelled() || service->shutting_down_.load(); },
          [service](const TaskEvent& event) { service->Observe(event); });
      LOG(INFO) << request.job_id() << ": " << (status.ok() ? "finished" : status.ToString());
      out->Close(ToGrpcStatus(status));
      {
        absl::MutexLock lock(&service->task_mu_);
        service->task_job_.clear();
      }
      // Last: Shutdown waits for this, and the service may be destroyed right after.
      service->busy_gauge_.Set(0);
      service->busy_.store(false);
    }).detach();
  }
};

namespace {

class RefusedReactor : public grpc::ServerWriteReactor<TaskEvent> {
 public:
  explicit RefusedReactor(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

WorkerService::WorkerService(WorkerServiceOptions options, prometheus::Registry& registry)
    : options_(std::move(options)),
      busy_gauge_(prometheus::BuildGauge()
                      .Name("lumen_worker_busy")
                      .Help("1 while the worker runs a task")
                      .Register(registry)
                      .Add({{"worker", options_.name}})),
      steps_counter_(prometheus::BuildCounter()
                         .Name("lumen_worker_steps_total")
                         .Help("Optimizer steps completed by the worker")
                         .Register(registry)
                         .Add({{"worker", options_.name}})),
      tokens_counter_(prometheus::BuildCounter()
                          .Name("lumen_worker_tokens_total")
                          .Help("Tokens trained by the worker")
                          .Register(registry)
                          .Add({{"worker", options_.name}})),
      step_time_gauge_(prometheus::BuildGauge()
                           .Name("lumen_worker_step_time_seconds")
                           .Help("Wall time of the worker's last step")
                           .Register(registry)
                           .Add({{"worker", options_.name}})),
      memory_peak_gauge_(prometheus::BuildGauge()
                             .Name("lumen_worker_device_memory_peak_bytes")
                             .Help("Most device memory the worker's last step held at once")
                             .Register(registry)
                             .Add({{"worker", options_.name}})),
      bytes_moved_(prometheus::BuildCounter()
                       .Name("lumen_worker_bytes_moved_total")
                       .Help("Bytes moved between the device and the memstore, by direction")
                       .Register(registry)),
      device_busy_gauge_(prometheus::BuildGauge()
                      .Name("lumen_worker_device_busy_fraction")
                      .Help("Fraction of the worker's last step the device spent computing")
                      .Register(registry)
                      .Add({{"worker", options_.name}})),
      prefetch_hit_gauge_(prometheus::BuildGauge()
                              .Name("lumen_worker_prefetch_hit_rate")
                              .Help("Reads from the memstore in the last step that had arrived "
                                    "before the device needed them, of all such reads")
                              .Register(registry)
                              .Add({{"worker", options_.name}})),
      read_ahead_gauge_(prometheus::BuildGauge()
                            .Name("lumen_worker_read_ahead_fraction")
                            .Help("Reads from the memstore in the last step that were issued "
                                  "ahead of need (prefetches, arrived or not), of all such reads")
                            .Register(registry)
                            .Add({{"worker", options_.name}})),
      stall_seconds_(prometheus::BuildCounter()
                         .Name("lumen_worker_stall_seconds_total")
                         .Help("Seconds the device stood waiting, by cause (transfer, "
                               "optimizer, memory)")
                         .Register(registry)) {
  // Every label exists from the start, so dashboards show 0 rather than no data.
  for (const char* pair : {"host->device", "device->host"}) {
    bytes_moved_.Add({{"worker", options_.name}, {"pair", pair}});
  }
  for (const char* cause : {"transfer", "optimizer", "memory"}) {
    stall_seconds_.Add({{"worker", options_.name}, {"cause", cause}});
  }
  prometheus::BuildGauge()
      .Name("lumen_worker_device_memory_budget_bytes")
      .Help("Device memory the worker may use")
      .Register(registry)
      .Add({{"worker", options_.name}, {"device", options_.device}})
      .Set(static_cast<double>(options_.runner.device_memory_budget_bytes));
}

void WorkerService::Observe(const TaskEvent& event) {
  if (!event.has_step()) return;
  steps_counter_.Increment();
  tokens_counter_.Increment(static_cast<double>(event.step().tokens()));
  step_time_gauge_.Set(event.step().step_time_s());
  memory_peak_gauge_.Set(static_cast<double>(event.step().device_memory_peak_bytes()));
  for (const auto& [pair, bytes] : event.step().bytes_moved()) {
    bytes_moved_.Add({{"worker", options_.name}, {"pair", pair}})
        .Increment(static_cast<double>(bytes));
  }
  device_busy_gauge_.Set(event.step().device_busy_fraction());
  prefetch_hit_gauge_.Set(event.step().prefetch_hit_rate());
  read_ahead_gauge_.Set(event.step().read_ahead_fraction());
  for (const auto& [cause, seconds] : event.step().stall_seconds()) {
    stall_seconds_.Add({{"worker", options_.name}, {"cause", cause}}).Increment(seconds);
  }
}

WorkerService::~WorkerService() { Shutdown(); }

grpc::ServerWriteReactor<TaskEvent>* WorkerService::RunTask(grpc::CallbackServerContext* context,
                                                            const RunTaskRequest* request) {
  if (shutting_down_.load()) {
    return new RefusedReactor(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                           absl::StrCat(options_.name, " is shutting down")));
  }
  bool expected = false;
  if (!busy_.compare_exchange_strong(expected, true)) {
    // ABORTED: nothing was started, the caller may retry once the running task has stopped.
    return new RefusedReactor(grpc::Status(grpc::StatusCode::ABORTED,
                                           absl::StrCat(options_.name, " is busy with a task")));
  }
  {
    absl::MutexLock lock(&task_mu_);
    task_job_ = request->job_id();
  }
  return new RunTaskReactor(*request, this);
}

grpc::ServerUnaryReactor* WorkerService::GetWorkerInfo(grpc::CallbackServerContext* context,
                                                       const GetWorkerInfoRequest* request,
                                                       WorkerInfo* reply) {
  reply->set_name(options_.name);
  reply->set_device(options_.device);
  reply->set_device_name(options_.device_name);
  reply->set_device_memory_budget_bytes(options_.runner.device_memory_budget_bytes);
  reply->set_num_threads(options_.runner.num_threads);
  reply->set_link_bytes_per_s(options_.runner.link_bytes_per_s);
  reply->set_optimizer_state_tier(
      engine::HomeTierName(options_.runner.optimizer_state_tier));
  {
    absl::MutexLock lock(&task_mu_);
    reply->set_running_job(task_job_);
  }
  for (const auto& [key, value] : options_.profile) (*reply->mutable_profile())[key] = value;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::CheckTask(grpc::CallbackServerContext* context,
                                                   const CheckTaskRequest* request,
                                                   CheckTaskReply* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<ResourceClaims> claims =
      lumen::CheckTask(request->spec(), options_.runner, request->host_available_bytes());
  if (claims.ok()) *reply->mutable_claims() = *std::move(claims);
  reactor->Finish(ToGrpcStatus(claims.status()));
  return reactor;
}

void WorkerService::Shutdown() {
  shutting_down_.store(true);
  while (busy_.load()) absl::SleepFor(absl::Milliseconds(10));
}

}  // namespace lumen
