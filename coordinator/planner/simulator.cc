#include "coordinator/planner/simulator.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lumen {

const char* TierName(Tier t) {
  switch (t) {
    case Tier::kDevice:
      return "device";
    case Tier::kHost:
      return "host";
    case Tier::kNvme:
      return "nvme";
  }
  return "?";
}

const char* OpKindName(OpKind k) {
  switch (k) {
    case OpKind::kCompute:
      return "compute";
    case OpKind::kTransfer:
      return "transfer";
    case OpKind::kOptimizer:
      return "optimizer";
    case OpKind::kReduce:
      return "reduce";
    case OpKind::kRelease:
      return "release";
    case OpKind::kWait:
      return "wait";
  }
  return "?";
}

const char* LaneName(Lane l) {
  switch (l) {
    case Lane::kCompute:
      return "compute";
    case Lane::kHostToDevice:
      return "h2d";
    case Lane::kDeviceToHost:
      return "d2h";
    case Lane::kHostCpu:
      return "host-cpu";
    case Lane::kNvmeParams:
      return "nvme-params";
    case Lane::kNvmeOptimizer:
      return "nvme-optimizer";
    case Lane::kNvmeActivations:
      return "nvme-activations";
    case Lane::kNvmeWriteBack:
      return "nvme-write-back";
    case Lane::kControl:
      return "control";
  }
  return "?";
}

namespace {

// Resource indices: per worker compute, h2d, d2h; then host memory, CPU optimizer, drives.
class Resources {
 public:
  Resources(int workers, int drives) : workers_(workers), drives_(drives) {}
  int size() const { return 3 * workers_ + 2 + drives_; }
  int Compute(int w) const { return 3 * w; }
  int H2d(int w) const { return 3 * w + 1; }
  int D2h(int w) const { return 3 * w + 2; }
  int HostMemory() const { return 3 * workers_; }
  int CpuOptimizer() const { return 3 * workers_ + 1; }
  int Drive(int d) const { return 3 * workers_ + 2 + d; }
  int drives() const { return drives_; }

  ResourceUsage Describe(int r) const {
    if (r < 3 * workers_) {
      const std::string w = absl::StrCat("worker-", r / 3);
      switch (r % 3) {
        case 0:
          return {absl::StrCat(w, " compute"), "device compute"};
        case 1:
          return {absl::StrCat(w, " link h2d"), "host link h2d"};
        default:
          return {absl::StrCat(w, " link d2h"), "host link d2h"};
      }
    }
    if (r == HostMemory()) return {"host memory", "host memory"};
    if (r == CpuOptimizer()) return {"cpu optimizer", "cpu optimizer"};
    return {absl::StrCat("nvme-", r - Drive(0)), "nvme"};
  }

 private:
  int workers_;
  int drives_;
};

using Demand = std::vector<std::pair<int, double>>;  // (resource, seconds alone)

// Seconds the op would occupy each resource if it ran alone.
absl::StatusOr<Demand> DemandOf(const Op& op, const Resources& res, const HardwareProfile& hw,
                                bool bf16, int workers) {
  Demand d;
  const double host_bw = hw.host.MemoryBandwidth();
  const double link = hw.device.LinkBandwidth();
  auto need_worker = [&]() -> absl::Status {
    if (op.worker < 0 || op.worker >= workers) {
      return absl::InvalidArgumentError(
          absl::StrCat("op ", op.id, " (", op.label, ") runs on worker ", op.worker,
                       " but the schedule has ", workers, " workers"));
    }
    return absl::OkStatus();
  };
  auto nvme = [&](double bytes, bool write) -> absl::Status {
    if (res.drives() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "op ", op.id, " (", op.label, ") uses NVMe but the hardware profile has no drives"));
    }
    const double per_drive = write ? hw.nvme.write_per_drive : hw.nvme.read_per_drive;
    for (int i = 0; i < res.drives(); ++i) {
      d.push_back({res.Drive(i), bytes / res.drives() / per_drive});
    }
    return absl::OkStatus();
  };
  const double bytes = static_cast<double>(op.bytes);
  switch (op.kind) {
    case OpKind::kCompute: {
      if (auto s = need_worker(); !s.ok()) return s;
      d.push_back({res.Compute(op.worker), op.flops / hw.device.MatmulFlops(bf16)});
      const double in = static_cast<double>(op.activation_in_bytes);
      const double out = static_cast<double>(op.activation_out_bytes);
      if (in > 0) d.push_back({res.H2d(op.worker), in / link});
      if (out > 0) d.push_back({res.D2h(op.worker), out / link});
      if (in + out > 0) d.push_back({res.HostMemory(), (in + out) / host_bw});
      break;
    }
    case OpKind::kTransfer: {
      if (op.src == op.dst) break;
      d.push_back({res.HostMemory(), bytes / host_bw});
      if (op.src == Tier::kDevice || op.dst == Tier::kDevice) {
        if (auto s = need_worker(); !s.ok()) return s;
      }
      if (op.dst == Tier::kDevice) d.push_back({res.H2d(op.worker), bytes / link});
      if (op.src == Tier::kDevice) d.push_back({res.D2h(op.worker), bytes / link});
      if (op.src == Tier::kNvme) {
        if (auto s = nvme(bytes, false); !s.ok()) return s;
      }
      if (op.dst == Tier::kNvme) {
        if (auto s = nvme(bytes, true); !s.ok()) return s;
      }
      break;
    }
    case OpKind::kOptimizer:
      if (op.worker >= 0) {
        if (auto s = need_worker(); !s.ok()) return s;
        d.push_back({res.Compute(op.worker), bytes / hw.device.memory_bandwidth});
      } else {
        d.push_back({res.CpuOptimizer(),
                     static_cast<double>(op.params) / hw.host.cpu_optimizer_params_per_s});
        d.push_back({res.HostMemory(), bytes / host_bw});
      }
      break;
    case OpKind::kReduce:
      d.push_back({res.HostMemory(), bytes / host_bw});
      break;
    case OpKind::kRelease:
    case OpKind::kWait:
      break;
  }
  // A CPU device computes on the host's cores: the memstore calls an op makes, and the host
  // optimizer's arithmetic, take time from the device's compute.
  if (hw.device.shares_host_cpu && workers > 0) {
    const int w = op.worker >= 0 ? op.worker : 0;
    double cpu = static_cast<double>(op.host_calls) * hw.device.host_call_seconds;
    if (op.kind == OpKind::kOptimizer && op.worker < 0) {
      cpu += static_cast<double>(op.params) / hw.host.cpu_optimizer_params_per_s;
    }
    if (cpu > 0) {
      auto same = std::find_if(d.begin(), d.end(),
                               [&](const auto& e) { return e.first == res.Compute(w); });
      if (same != d.end()) {
        same->second += cpu;
      } else {
        d.push_back({res.Compute(w), cpu});
      }
    }
  }
  // Drop zero demands so zero-byte ops finish at once.
  d.erase(std::remove_if(d.begin(), d.end(), [](const auto& e) { return !(e.second > 0); }),
          d.end());
  return d;
}

std::string StreamKey(const Op& op) { return absl::StrCat(op.worker, "/", LaneName(op.lane)); }

}  // namespace

absl::StatusOr<SimResult> Simulate(const Schedule& schedule, const HardwareProfile& hw,
                                   bool bf16) {
  const int workers = schedule.num_workers;
  const Resources res(workers, hw.nvme.drives);
  const int n = static_cast<int>(schedule.ops.size());

  std::vector<Demand> demand(n);
  std::vector<double> max_demand(n, 0);
  std::vector<int> deps_left(n, 0);
  std::vector<std::vector<int>> dependents(n);
  // Lanes: (worker, lane) → op ids in schedule order.
  std::map<std::string, int> lane_index;
  std::vector<std::string> lane_names;
  std::vector<std::vector<int>> lanes;
  std::vector<int> lane_of(n);
  for (const Op& op : schedule.ops) {
    auto d = DemandOf(op, res, hw, bf16, workers);
    if (!d.ok()) return d.status();
    demand[op.id] = *std::move(d);
    for (const auto& [r, s] : demand[op.id]) max_demand[op.id] = std::max(max_demand[op.id], s);
    for (int32_t dep : op.deps) {
      if (dep < 0 || dep >= n) {
        return absl::InvalidArgumentError(
            absl::StrCat("op ", op.id, " (", op.label, ") depends on missing op ", dep));
      }
      ++deps_left[op.id];
      dependents[dep].push_back(op.id);
    }
    const std::string key = StreamKey(op);
    auto [it, inserted] = lane_index.emplace(key, static_cast<int>(lanes.size()));
    if (inserted) {
      lanes.emplace_back();
      lane_names.push_back(key);
    }
    lane_of[op.id] = it->second;
    lanes[it->second].push_back(op.id);
  }
  std::vector<size_t> lane_head(lanes.size(), 0);  // next op to start in each lane
  std::vector<bool> lane_busy(lanes.size(), false);

  SimResult out;
  out.op_start_s.assign(n, -1);
  out.op_end_s.assign(n, -1);
  std::vector<double> busy(res.size(), 0);
  std::vector<int> active;
  std::vector<double> progress(n, 0);
  int done = 0;
  double now = 0;

  // Lanes whose head may have become startable.
  std::vector<int> dirty(lanes.size());
  std::iota(dirty.begin(), dirty.end(), 0);
  auto finish = [&](int id) {
    out.op_end_s[id] = now;
    ++done;
    lane_busy[lane_of[id]] = false;
    dirty.push_back(lane_of[id]);
    for (int d : dependents[id]) {
      if (--deps_left[d] == 0) dirty.push_back(lane_of[d]);
    }
  };
  // Starts every startable op; zero-work ops finish at once (which may unblock others).
  auto start_ready = [&]() {
    while (!dirty.empty()) {
      const int lane = dirty.back();
      dirty.pop_back();
      if (lane_busy[lane] || lane_head[lane] >= lanes[lane].size()) continue;
      const int id = lanes[lane][lane_head[lane]];
      if (deps_left[id] > 0) continue;
      ++lane_head[lane];
      out.op_start_s[id] = now;
      lane_busy[lane] = true;
      if (max_demand[id] <= 0) {
        finish(id);
      } else {
        active.push_back(id);
      }
    }
  };

  std::vector<double> lambda;
  std::vector<double> frozen_load(res.size());
  std::vector<double> unfrozen_load(res.size());
  while (true) {
    start_ready();
    if (active.empty()) break;
    // Weighted max-min fair rates by progressive filling: every unfrozen op runs at the same
    // fraction λ of its solo rate; raise λ until a resource saturates, freeze its users.
    lambda.assign(active.size(), -1);
    std::fill(frozen_load.begin(), frozen_load.end(), 0.0);
    size_t frozen = 0;
    while (frozen < active.size()) {
      std::fill(unfrozen_load.begin(), unfrozen_load.end(), 0.0);
      for (size_t i = 0; i < active.size(); ++i) {
        if (lambda[i] >= 0) continue;
        const int id = active[i];
        for (const auto& [r, s] : demand[id]) unfrozen_load[r] += s / max_demand[id];
      }
      double level = 1.0;
      for (int r = 0; r < res.size(); ++r) {
        if (unfrozen_load[r] > 0) {
          level = std::min(level, std::max(0.0, 1.0 - frozen_load[r]) / unfrozen_load[r]);
        }
      }
      for (size_t i = 0; i < active.size(); ++i) {
        if (lambda[i] >= 0) continue;
        const int id = active[i];
        bool saturated = level >= 1.0;
        for (const auto& [r, s] : demand[id]) {
          saturated |= frozen_load[r] + unfrozen_load[r] * level >= 1.0 - 1e-12;
        }
        if (!saturated) continue;
        lambda[i] = level;
        ++frozen;
      }
      for (int r = 0; r < res.size(); ++r) frozen_load[r] = 0;
      for (size_t i = 0; i < active.size(); ++i) {
        if (lambda[i] < 0) continue;
        const int id = active[i];
        for (const auto& [r, s] : demand[id]) frozen_load[r] += s / max_demand[id] * lambda[i];
      }
    }
    // Advance to the next completion.
    double dt = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < active.size(); ++i) {
      const int id = active[i];
      const double rate = lambda[i] / max_demand[id];
      if (rate > 0) dt = std::min(dt, (1.0 - progress[id]) / rate);
    }
    if (!std::isfinite(dt)) {
      return absl::InternalError("simulator: no active op can progress");
    }
    now += dt;
    std::vector<int> still;
    for (size_t i = 0; i < active.size(); ++i) {
      const int id = active[i];
      const double rate = lambda[i] / max_demand[id];
      progress[id] += rate * dt;
      for (const auto& [r, s] : demand[id]) busy[r] += s * rate * dt;
      if (progress[id] >= 1.0 - 1e-9) {
        finish(id);
      } else {
        still.push_back(id);
      }
    }
    active.swap(still);
  }
  if (done < n) {
    for (size_t lane = 0; lane < lanes.size(); ++lane) {
      const std::vector<int>& ids = lanes[lane];
      const size_t head = lane_head[lane];
      const std::string& key = lane_names[lane];
      if (head >= ids.size()) continue;
      const Op& op = schedule.ops[ids[head]];
      std::string waiting;
      for (int32_t dep : op.deps) {
        if (out.op_end_s[dep] < 0) {
          waiting = absl::StrCat(dep, " (", schedule.ops[dep].label, ")");
          break;
        }
      }
      return absl::FailedPreconditionError(absl::StrCat(
          "schedule deadlocks: op ", op.id, " (", op.label, ") on lane ", key,
          " waits for op ", waiting, "; ", n - done, " of ", n, " ops never ran"));
    }
    return absl::FailedPreconditionError("schedule deadlocks");
  }

  out.step_time_s = now;
  double device_busy = 0;
  std::map<std::string, double> group_max;
  for (int r = 0; r < res.size(); ++r) {
    ResourceUsage u = res.Describe(r);
    u.busy_s = busy[r];
    u.busy_fraction = now > 0 ? busy[r] / now : 0;
    if (r < 3 * workers && r % 3 == 0) device_busy += u.busy_fraction;
    group_max[u.group] = std::max(group_max[u.group], u.busy_fraction);
    out.resources.push_back(u);
  }
  out.device_busy_fraction = workers > 0 ? device_busy / workers : 0;
  // Ties go to the first group in this order.
  for (const char* g : {"device compute", "nvme", "host memory", "host link h2d", "host link d2h",
                        "cpu optimizer"}) {
    auto it = group_max.find(g);
    if (it == group_max.end()) continue;
    if (out.binding_resource.empty() || it->second > out.binding_busy_fraction + 1e-9) {
      out.binding_resource = g;
      out.binding_busy_fraction = it->second;
    }
  }
  for (const Op& op : schedule.ops) {
    if (op.kind == OpKind::kTransfer && op.src != op.dst) {
      out.bytes_moved[absl::StrCat(TierName(op.src), "->", TierName(op.dst))] += op.bytes;
      if (op.dst == Tier::kNvme) out.nvme_bytes_written += op.bytes;
      if (op.src == Tier::kNvme) out.nvme_bytes_read += op.bytes;
    } else if (op.kind == OpKind::kCompute) {
      if (op.activation_in_bytes > 0) out.bytes_moved["host->device"] += op.activation_in_bytes;
      if (op.activation_out_bytes > 0) {
        out.bytes_moved["device->host"] += op.activation_out_bytes;
      }
    }
  }
  return out;
}

}  // namespace lumen
