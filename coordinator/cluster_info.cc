#include "coordinator/cluster_info.h"

#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_split.h"
#include "glog/logging.h"
#include "google/protobuf/util/json_util.h"

namespace lumen {

ClusterInfoCollector::ClusterInfoCollector(std::string data_dir, std::string node_status_file,
                                           std::vector<WorkerClient*> workers,
                                           MemstoreClient* memstore, JobManager* jobs)
    : data_dir_(std::move(data_dir)),
      node_status_file_(std::move(node_status_file)),
      workers_(std::move(workers)),
      memstore_(memstore),
      jobs_(jobs) {}

GetClusterInfoReply ClusterInfoCollector::Collect() {
  GetClusterInfoReply reply;
  reply.set_data_dir(data_dir_);
  if (!node_status_file_.empty()) {
    std::ifstream in(node_status_file_);
    std::stringstream text;
    text << in.rdbuf();
    // node.json is written by lumend; its process entries have ProcessInfo's field names.
    GetClusterInfoReply node;
    google::protobuf::util::JsonParseOptions options;
    options.ignore_unknown_fields = true;
    if (in && google::protobuf::util::JsonStringToMessage(text.str(), &node, options).ok()) {
      *reply.mutable_processes() = node.processes();
    } else {
      LOG(WARNING) << "cannot read the node status " << node_status_file_;
    }
  }
  std::map<std::string, std::string> running;  // worker -> job
  for (const Job& job : jobs_->List()) {
    if (job.state() != RUNNING) continue;
    // A job on several workers names them all ("worker-0,worker-1").
    for (absl::string_view name : absl::StrSplit(job.worker(), ',', absl::SkipEmpty())) {
      running[std::string(name)] = job.id();
    }
  }
  for (WorkerClient* worker : workers_) {
    auto info = worker->GetInfo(absl::Seconds(2));
    if (info.ok()) {
      WorkerInfo* out = reply.add_workers();
      *out = *info;
      out->set_reachable(true);
    } else {
      WorkerInfo* out = reply.add_workers();
      out->set_name(worker->name());
      out->set_reachable(false);
      out->set_error(info.status().ToString());
    }
    auto it = running.find(worker->name());
    if (it != running.end()) reply.mutable_workers()->rbegin()->set_running_job(it->second);
  }
  if (memstore_ != nullptr) {
    auto stats = memstore_->GetStats(absl::Seconds(2));
    if (stats.ok()) {
      *reply.mutable_tiers() = stats->tiers();
      *reply.mutable_lost_tensors() = stats->lost_tensors();
      reply.set_memstore_tensors(stats->tensors());
      reply.set_memstore_checksum_failures(stats->checksum_failures());
      *reply.mutable_memstore_profile() = stats->profile();
    } else {
      reply.set_memstore_error(stats.status().ToString());
    }
  }
  for (const auto& [state, count] : jobs_->JobsByState()) {
    (*reply.mutable_jobs_by_state())[state] = count;
  }
  return reply;
}

}  // namespace lumen
