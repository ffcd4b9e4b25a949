#include "common/metrics.h"

#include <chrono>
#include <exception>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "grpcpp/support/interceptor.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"

namespace lumen {

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Create(const std::string& address) {
  auto checked = LoopbackListenAddress(address);
  if (!checked.ok()) return checked.status();
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->registry_ = std::make_shared<prometheus::Registry>();
  try {
    server->exposer_ = std::make_unique<prometheus::Exposer>(*checked, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  server->exposer_->RegisterCollectable(server->registry_);
  const auto ports = server->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("metrics endpoint ", address, " is not listening"));
  }
  server->address_ = absl::StrCat(address.substr(0, address.rfind(':')), ":", ports.front());
  return server;
}

namespace {

class RpcMetrics {
 public:
  explicit RpcMetrics(prometheus::Registry& registry)
      : requests_(prometheus::BuildCounter()
                      .Name("lumen_rpc_requests_total")
                      .Help("RPCs served, by method and status code")
                      .Register(registry)),
        duration_(prometheus::BuildHistogram()
                      .Name("lumen_rpc_duration_seconds")
                      .Help("Time from receiving an RPC to sending its status")
                      .Register(registry)) {}

  void Record(const std::string& method, grpc::StatusCode code, double seconds) {
    requests_.Add({{"method", method}, {"code", CodeName(code)}}).Increment();
    duration_
        .Add({{"method", method}},
             prometheus::Histogram::BucketBoundaries{0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
                                                     1, 5, 30, 300, 3600})
        .Observe(seconds);
  }

 private:
  static std::string CodeName(grpc::StatusCode code) {
    static const char* kNames[] = {"OK",
                                   "CANCELLED",
                                   "UNKNOWN",
                                   "INVALID_ARGUMENT",
                                   "DEADLINE_EXCEEDED",
                                   "NOT_FOUND",
                                   "ALREADY_EXISTS",
                                   "PERMISSION_DENIED",
                                   "RESOURCE_EXHAUSTED",
                                   "FAILED_PRECONDITION",
                                   "ABORTED",
                                   "OUT_OF_RANGE",
                                   "UNIMPLEMENTED",
                                   "INTERNAL",
                                   "UNAVAILABLE",
                                   "DATA_LOSS",
                                   "UNAUTHENTICATED"};
    const int index = static_cast<int>(code);
    return index >= 0 && index < 17 ? kNames[index] : absl::StrCat(index);
  }

  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& duration_;
};

class RpcMetricsInterceptorImpl : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptorImpl(RpcMetrics* metrics, const char* method)
      : metrics_(metrics), method_(method), start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      metrics_->Record(method_, methods->GetSendStatus().error_code(), seconds);
    }
    methods->Proceed();
  }

 private:
  RpcMetrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
};

class RpcMetricsFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsFactory(prometheus::Registry& registry) : metrics_(registry) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcMetricsInterceptorImpl(&metrics_, info->method());
  }

 private:
  RpcMetrics metrics_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> RpcMetricsInterceptor(
    prometheus::Registry& registry) {
  return std::make_unique<RpcMetricsFactory>(registry);
}

}  // namespace lumen
