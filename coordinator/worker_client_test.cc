#include "coordinator/worker_client.h"

#include <atomic>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/process.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {
namespace {

// A worker whose task streams nothing until cancelled, then runs on for `linger` (as a real
// task does until it notices the cancel), reporting its job in GetWorkerInfo until it ends.
class LingeringWorker : public Worker::CallbackService {
 public:
  explicit LingeringWorker(absl::Duration linger) : linger_(linger) {}
  ~LingeringWorker() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (std::thread& t : tasks_) t.join();
  }

  grpc::ServerWriteReactor<TaskEvent>* RunTask(grpc::CallbackServerContext* context,
                                               const RunTaskRequest* request) override {
    class Reactor : public grpc::ServerWriteReactor<TaskEvent> {
     public:
      explicit Reactor(LingeringWorker* worker) : worker_(worker) {}
      void OnCancel() override {
        worker_->tasks_.emplace_back([w = worker_] {
          absl::MutexLock lock(&w->mu_);
          w->mu_.AwaitWithTimeout(absl::Condition(&w->stopping_), w->linger_);
          w->job_.clear();
          w->task_ended_ = absl::Now();
        });
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      }
      void OnDone() override { delete this; }

     private:
      LingeringWorker* worker_;
    };
    absl::MutexLock lock(&mu_);
    job_ = request->job_id();
    return new Reactor(this);
  }

  grpc::ServerUnaryReactor* GetWorkerInfo(grpc::CallbackServerContext* context,
                                          const GetWorkerInfoRequest* request,
                                          WorkerInfo* reply) override {
    {
      absl::MutexLock lock(&mu_);
      reply->set_running_job(job_);
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  absl::Time task_ended() {
    absl::MutexLock lock(&mu_);
    return task_ended_;
  }

 private:
  const absl::Duration linger_;
  std::vector<std::thread> tasks_;  // started on gRPC threads, one at a time here
  absl::Mutex mu_;
  std::string job_ ABSL_GUARDED_BY(mu_);
  absl::Time task_ended_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

// Sockets under /tmp (Bazel's TEST_TMPDIR is too long for a Unix socket path), removed after.
class GrpcWorkerClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/lumen-worker-client-XXXXXX";
    dir_ = new std::string(mkdtemp(tmpl));
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
  }
  static std::string SocketPath(const char* name) {
    return absl::StrCat(*dir_, "/", name, ".sock");
  }
  static std::string* dir_;
};
std::string* GrpcWorkerClientTest::dir_ = nullptr;

// Runs a task of `job` on `client`, cancels it after 200 ms and then calls `after_cancel`;
// returns RunTask's status.
absl::Status RunAndCancel(GrpcWorkerClient& client, const std::string& job,
                          const std::function<void()>& after_cancel) {
  RunTaskRequest request;
  request.set_job_id(job);
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(200));
    client.CancelTask(job);
    after_cancel();
  });
  absl::Status status = client.RunTask(request, [](const TaskEvent&) {});
  canceller.join();
  return status;
}

// The coordinator frees a run's tensors and starts the next run when RunTask returns: after a
// cancel, it returns only once the worker's task has stopped.
TEST_F(GrpcWorkerClientTest, ACancelledRunTaskReturnsOnceTheWorkersTaskStopped) {
  LingeringWorker worker(absl::Milliseconds(600));
  prometheus::Registry registry;
  auto server = StartGrpcServer({SocketPath("linger"), ""}, {&worker}, registry);
  ASSERT_TRUE(server.ok()) << server.status();
  GrpcWorkerClient client("worker-0", SocketPath("linger"), absl::Seconds(10));
  absl::Status status = RunAndCancel(client, "job-000009", [] {});
  EXPECT_TRUE(absl::IsCancelled(status)) << status;
  EXPECT_NE(worker.task_ended(), absl::InfinitePast());
  (*server)->Shutdown();
}

// A worker that stops answering (killed) ends the wait at once.
TEST_F(GrpcWorkerClientTest, ACancelledTaskOfAWorkerThatIsGoneDoesNotWait) {
  auto worker = std::make_unique<LingeringWorker>(absl::Seconds(30));
  prometheus::Registry registry;
  auto server = StartGrpcServer({SocketPath("gone"), ""}, {worker.get()}, registry);
  ASSERT_TRUE(server.ok()) << server.status();
  GrpcWorkerClient client("worker-1", SocketPath("gone"), absl::Seconds(30));
  const absl::Time start = absl::Now();
  absl::Status status = RunAndCancel(client, "job-000010", [&] {
    (*server)->Shutdown(std::chrono::system_clock::now());  // the worker dies
  });
  EXPECT_TRUE(absl::IsCancelled(status)) << status;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(worker->task_ended(), absl::InfinitePast());  // it still lingers
  server->reset();
  worker.reset();  // ends and joins the lingering task
}

}  // namespace
}  // namespace lumen
