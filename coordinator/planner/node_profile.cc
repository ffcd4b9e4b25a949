#include "coordinator/planner/node_profile.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "proto/lumen.pb.h"

namespace lumen {
namespace {

double Figure(const google::protobuf::Map<std::string, double>& figures, const std::string& key) {
  auto it = figures.find(key);
  return it == figures.end() ? 0 : it->second;
}

}  // namespace

double MeasuredDeviceFlops(const WorkerInfo& worker, int64_t hidden_size) {
  constexpr absl::string_view kPrefix = "decoder_flops_per_s_h";
  std::map<double, double> rates;  // hidden size -> FLOP/s
  for (const auto& [key, value] : worker.profile()) {
    int64_t h = 0;
    if (absl::StartsWith(key, kPrefix) && absl::SimpleAtoi(key.substr(kPrefix.size()), &h) &&
        h > 0 && value > 0) {
      rates[static_cast<double>(h)] = value;
    }
  }
  if (rates.empty()) {
    const double bf16 = Figure(worker.profile(), "bf16_gemm_flops");
    return bf16 > 0 ? bf16 : Figure(worker.profile(), "fp32_gemm_flops");
  }
  const double h = static_cast<double>(std::max<int64_t>(1, hidden_size));
  if (h <= rates.begin()->first) return rates.begin()->second;
  if (h >= rates.rbegin()->first) return rates.rbegin()->second;
  auto hi = rates.lower_bound(h);
  auto lo = std::prev(hi);
  const double t = std::log(h / lo->first) / std::log(hi->first / lo->first);
  return lo->second + t * (hi->second - lo->second);
}

absl::StatusOr<NodeProfile> NodeHardwareProfile(const GetClusterInfoReply& cluster,
                                                int64_t hidden_size) {
  NodeProfile node;
  HardwareProfile& hw = node.hardware;
  hw.name = "node";
  hw.source = absl::StrCat("measured by the node at ", cluster.data_dir());
  // Every worker of the node counts, one that is restarting after a crash too (lumend brings
  // it back, and a job resumed on the node meanwhile plans on all of them); the figures are
  // the first reachable one's (the node's workers drive alike devices).
  const WorkerInfo* first = nullptr;
  for (const WorkerInfo& w : cluster.workers()) {
    ++hw.device.count;
    if (first == nullptr && w.reachable() && !w.profile().empty()) first = &w;
  }
  if (first == nullptr) {
    return absl::FailedPreconditionError(
        "no worker of the node reported measured figures; is the node still starting? "
        "(lumenctl cluster shows each worker)");
  }
  if (!cluster.memstore_error().empty() || cluster.memstore_profile().empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the memstore reported no measured figures",
        cluster.memstore_error().empty() ? "" : ": " + cluster.memstore_error()));
  }
  DeviceProfile& d = hw.device;
  d.kind = absl::StrCat(first->device(), " (measured)");
  d.memory_bytes = first->device_memory_budget_bytes();
  d.usable_memory_fraction = 1.0;
  d.peak_fp32_flops = d.peak_bf16_flops = MeasuredDeviceFlops(*first, hidden_size);
  d.matmul_efficiency = 1.0;
  d.memory_bandwidth = Figure(first->profile(), "copy_bytes_per_s");
  // The link: the modelled one when set, else a CUDA worker's measured pinned host->device
  // copies, else (the CPU device) its memory copies.
  const double h2d = Figure(first->profile(), "h2d_bytes_per_s");
  d.link_peak = first->link_bytes_per_s() > 0 ? first->link_bytes_per_s()
                : h2d > 0                      ? h2d
                                               : d.memory_bandwidth;
  d.link_efficiency = 1.0;
  d.shares_host_cpu = first->device() == "cpu";
  // A call's wall time, not only its CPU time: the context switches and wake-ups around it
  // cost the device's threads too (on the CPU device the CPU-time figure under-predicts).
  d.host_call_seconds = Figure(first->profile(), "memstore_call_seconds");

  HostProfile& h = hw.host;
  const auto& mp = cluster.memstore_profile();
  h.memory_peak = Figure(mp, "host_copy_bytes_per_s");
  h.memory_efficiency = 1.0;
  h.cpu_optimizer_params_per_s = Figure(mp, "optimizer_params_per_s");
  h.usable_memory_fraction = 1.0;
  double read = 0, write = 0;
  int drives = 0;
  int64_t drive_capacity = 0;
  for (const TierInfo& t : cluster.tiers()) {
    if (t.name() == "host") {
      h.memory_bytes = t.capacity_bytes();
    } else if (absl::StartsWith(t.name(), "nvme")) {
      read += Figure(mp, absl::StrCat("nvme", drives, "_read_bytes_per_s"));
      write += Figure(mp, absl::StrCat("nvme", drives, "_write_bytes_per_s"));
      drive_capacity = drives == 0 ? t.capacity_bytes() : std::min(drive_capacity,
                                                                   t.capacity_bytes());
      ++drives;
    }
  }
  hw.nvme.drives = drives;
  hw.nvme.capacity_per_drive = drive_capacity;
  hw.nvme.read_per_drive = drives > 0 ? read / drives : 0;
  hw.nvme.write_per_drive = drives > 0 ? write / drives : 0;
  if (d.peak_fp32_flops <= 0 || d.link_peak <= 0 || h.memory_peak <= 0 ||
      h.cpu_optimizer_params_per_s <= 0) {
    return absl::FailedPreconditionError(
        "the node's measured figures are incomplete (device FLOP/s, link, host bandwidth or "
        "optimizer rate missing); restart lumend with --reprofile");
  }
  node.device_budget_bytes = first->device_memory_budget_bytes();
  node.optimizer_state_on_nvme = first->optimizer_state_tier() == "nvme";
  return node;
}

}  // namespace lumen
