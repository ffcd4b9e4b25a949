// The worker's gRPC service: RunTask streams a training run's events; one task at a time.
// Thread-safe.
#ifndef LUMEN_WORKER_SERVICE_H_
#define LUMEN_WORKER_SERVICE_H_

#include <atomic>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "proto/lumen.grpc.pb.h"
#include "worker/task_runner.h"

namespace lumen {

struct WorkerServiceOptions {
  std::string name = "worker-0";
  std::string device = "cpu";
  // WorkerInfo.device_name: the GPU's name and memory; empty on the CPU device.
  std::string device_name;
  // Measured device figures, reported by GetWorkerInfo.
  std::map<std::string, double> profile;
  TaskRunnerOptions runner;
};

class WorkerService final : public Worker::CallbackService {
 public:
  // Step metrics go to `registry`, which must outlive the service.
  WorkerService(WorkerServiceOptions options, prometheus::Registry& registry);
  ~WorkerService() override;

  grpc::ServerWriteReactor<TaskEvent>* RunTask(grpc::CallbackServerContext* context,
                                               const RunTaskRequest* request) override;
  grpc::ServerUnaryReactor* CheckTask(grpc::CallbackServerContext* context,
                                      const CheckTaskRequest* request,
                                      CheckTaskReply* reply) override;
  grpc::ServerUnaryReactor* GetWorkerInfo(grpc::CallbackServerContext* context,
                                          const GetWorkerInfoRequest* request,
                                          WorkerInfo* reply) override;

  // Asks a running task to stop and waits until none runs.
  void Shutdown();

 private:
  // Counts each step event before it is streamed.
  void Observe(const TaskEvent& event);

  const WorkerServiceOptions options_;
  prometheus::Gauge& busy_gauge_;
  prometheus::Counter& steps_counter_;
  prometheus::Counter& tokens_counter_;
  prometheus::Gauge& step_time_gauge_;
  prometheus::Gauge& memory_peak_gauge_;
  prometheus::Family<prometheus::Counter>& bytes_moved_;
  prometheus::Gauge& device_busy_gauge_;
  prometheus::Gauge& prefetch_hit_gauge_;
  prometheus::Gauge& read_ahead_gauge_;
  prometheus::Family<prometheus::Counter>& stall_seconds_;
  // True while a task runs; RunTask refuses a second one.
  std::atomic<bool> busy_{false};
  // The job of the task that runs, until its thread ends (a cancelled task runs on until it
  // notices); GetWorkerInfo reports it as running_job.
  absl::Mutex task_mu_;
  std::string task_job_ ABSL_GUARDED_BY(task_mu_);
  std::atomic<bool> shutting_down_{false};
  friend class RunTaskReactor;
};

}  // namespace lumen

#endif  // LUMEN_WORKER_SERVICE_H_
