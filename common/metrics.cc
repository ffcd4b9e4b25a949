#include "common/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "grpcpp/support/interceptor.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/text_serializer.h"

namespace lumen {

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Create(const std::string& address) {
  auto checked = LoopbackListenAddress(address);
  if (!checked.ok()) return checked.status();
  const size_t colon = checked->rfind(':');
  std::string host = checked->substr(0, colon);
  int port = 0;
  if (!absl::SimpleAtoi(checked->substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address ", address, ": bad port"));
  }
  const bool v6 = host == "[::1]";
  const int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_storage storage{};
  socklen_t len;
  if (v6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&storage);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    a->sin6_addr = in6addr_loopback;
    len = sizeof(*a);
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&storage);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof(*a);
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&storage), len) != 0 || listen(fd, 64) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", strerror(err)));
  }
  getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &len);
  const int bound = v6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port)
                       : ntohs(reinterpret_cast<sockaddr_in*>(&storage)->sin_port);
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->registry_ = std::make_shared<prometheus::Registry>();
  server->listen_fd_ = fd;
  server->address_ = absl::StrCat(v6 ? "[::1]" : "127.0.0.1", ":", bound);
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

MetricsServer::~MetricsServer() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
}

void MetricsServer::Serve() {
  while (!stop_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, /*timeout_ms=*/100) <= 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    Answer(fd);
    close(fd);
  }
}

void MetricsServer::Answer(int fd) {
  // Read the request head (Prometheus sends a small GET); give up after 2 s.
  std::string request;
  char buf[4096];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 65536) {
    pollfd p{fd, POLLIN, 0};
    const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                          deadline - std::chrono::steady_clock::now())
                                          .count());
    if (left <= 0 || poll(&p, 1, left) <= 0) return;
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) return;
    request.append(buf, n);
  }
  std::string status = "200 OK";
  std::string body;
  std::string type = "text/plain; version=0.0.4; charset=utf-8";
  const bool get = request.rfind("GET ", 0) == 0;
  const size_t path_end = request.find(' ', 4);
  const std::string path = get ? request.substr(4, path_end - 4) : "";
  if (!get) {
    status = "405 Method Not Allowed";
    body = "only GET\n";
    type = "text/plain";
  } else if (path == "/metrics" || path.rfind("/metrics?", 0) == 0) {
    body = prometheus::TextSerializer().Serialize(registry_->Collect());
  } else {
    status = "404 Not Found";
    body = "metrics are at /metrics\n";
    type = "text/plain";
  }
  const std::string response =
      absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                   "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
  size_t sent = 0;
  while (sent < response.size()) {
    const ssize_t n = send(fd, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += n;
  }
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
