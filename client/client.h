// The client library: a typed wrapper over the coordinator's Lumen service. Thread-safe.
#ifndef LUMEN_CLIENT_CLIENT_H_
#define LUMEN_CLIENT_CLIENT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

class LumenClient {
 public:
  // `target` is a Unix socket path or a loopback "host:port".
  static absl::StatusOr<std::unique_ptr<LumenClient>> Connect(const std::string& target);

  absl::StatusOr<Job> Submit(const std::string& spec_yaml, const std::string& base_dir);
  absl::StatusOr<std::vector<Job>> List();
  absl::StatusOr<Job> Get(const std::string& job_id);
  absl::StatusOr<Job> Cancel(const std::string& job_id);
  absl::StatusOr<GetClusterInfoReply> ClusterInfo();
  // Calls `on_event` for each event until the stream ends (with `follow`, when the job ends).
  absl::Status Watch(const std::string& job_id, bool follow,
                     const std::function<void(const WatchJobEvent&)>& on_event);

 private:
  LumenClient(std::string target, std::unique_ptr<Lumen::Stub> stub);
  // Turns a transport failure into a message that says which node could not be reached.
  absl::Status Explain(const grpc::Status& status) const;

  const std::string target_;
  const std::unique_ptr<Lumen::Stub> stub_;
};

}  // namespace lumen

#endif  // LUMEN_CLIENT_CLIENT_H_
