#include "coordinator/planner/planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/units.h"

namespace lumen {
namespace {

constexpr int kParams = static_cast<int>(TensorClass::kParams);
constexpr int kMaster = static_cast<int>(TensorClass::kMaster);
constexpr int kGrads = static_cast<int>(TensorClass::kGrads);
constexpr int kAdamM = static_cast<int>(TensorClass::kAdamM);
constexpr int kAdamV = static_cast<int>(TensorClass::kAdamV);
constexpr int kActs = static_cast<int>(TensorClass::kActivations);

int64_t ParamFetchBytes(const LayerDesc& l) { return l.bytes[kParams] + l.shared_param_bytes; }
int64_t OptimizerStateBytes(const LayerDesc& l) {
  return l.bytes[kMaster] + l.bytes[kAdamM] + l.bytes[kAdamV];
}

// Residency levels, most resident first.
enum class Level { kAll = 3, kParamsGrads = 2, kParams = 1, kNone = 0 };

// The fixed shape of one candidate: which layers each stage owns, micro-batches per replica.
struct Layout {
  Parallelism par;
  std::vector<std::vector<int>> stage_layers;    // [stage] → layer indices, ascending
  std::vector<std::vector<int64_t>> group_sizes;  // [replica] → micro-batches per group
  int Worker(int stage, int replica) const { return stage * par.replicas + replica; }
  int64_t MicroBatches(int replica) const {
    return std::accumulate(group_sizes[replica].begin(), group_sizes[replica].end(), int64_t{0});
  }
};

std::vector<int64_t> Split(int64_t total, int64_t parts) {
  std::vector<int64_t> out(parts, total / parts);
  for (int64_t i = 0; i < total % parts; ++i) ++out[i];
  return out;
}

Layout MakeLayout(const ModelDesc& m, const Parallelism& par) {
  Layout layout;
  layout.par = par;
  const int decoders = static_cast<int>(m.layers.size()) - 2;
  const std::vector<int64_t> per_stage = Split(decoders, par.stages);
  int next = 1;
  layout.stage_layers.resize(par.stages);
  for (int s = 0; s < par.stages; ++s) {
    if (s == 0) layout.stage_layers[s].push_back(0);
    for (int64_t i = 0; i < per_stage[s]; ++i) layout.stage_layers[s].push_back(next++);
    if (s == par.stages - 1) layout.stage_layers[s].push_back(next);
  }
  for (int64_t mb : Split(m.micro_batches, par.replicas)) {
    std::vector<int64_t> groups;
    for (int64_t g : Split(mb, std::min<int64_t>(par.groups, std::max<int64_t>(mb, 1)))) {
      if (g > 0) groups.push_back(g);
    }
    layout.group_sizes.push_back(groups);
  }
  return layout;
}

// Device bytes of one worker under a placement: resident homes, buffers, working memory.
struct DeviceUse {
  ClassBytes home{};
  int64_t buffers = 0;
  int64_t Total() const {
    return std::accumulate(home.begin(), home.end(), buffers);
  }
};

// Where activations are while a worker runs (see Placement::activations_partial).
enum class ActMode { kOnDevice, kPartial, kStreamed };

DeviceUse WorkerDeviceUse(const ModelDesc& m, const Layout& layout, int stage, int replica,
                          Level level, ActMode acts, const PlannerOptions& opt, int prefetch) {
  const bool acts_on_device = acts == ActMode::kOnDevice;
  DeviceUse u;
  const int64_t mb = layout.MicroBatches(replica);
  int64_t max_fetch = 0, max_grad = 0, max_act = 0, max_working = 0, largest_group = 0;
  for (int64_t g : layout.group_sizes[replica]) largest_group = std::max(largest_group, g);
  for (int l : layout.stage_layers[stage]) {
    const LayerDesc& d = m.layers[l];
    max_fetch = std::max(max_fetch, ParamFetchBytes(d));
    max_grad = std::max(max_grad, d.bytes[kGrads]);
    max_act = std::max(max_act, d.activation_bytes_per_micro_batch);
    max_working = std::max(max_working, d.working_bytes_per_micro_batch);
    if (level >= Level::kParams) u.home[kParams] += ParamFetchBytes(d);
    if (level >= Level::kParamsGrads) u.home[kGrads] += d.bytes[kGrads];
    if (level == Level::kAll) {
      u.home[kMaster] += d.bytes[kMaster];
      u.home[kAdamM] += d.bytes[kAdamM];
      u.home[kAdamV] += d.bytes[kAdamV];
    }
    if (acts_on_device) u.home[kActs] += d.activation_bytes_per_micro_batch * mb;
  }
  if (level == Level::kNone) u.buffers += (prefetch + 1) * max_fetch;
  // Distance 0 (reads on demand, the last resort of a tight budget) also copies gradients out
  // through a single buffer.
  if (level < Level::kParamsGrads) u.buffers += (prefetch == 0 ? 1 : 2) * max_grad;
  if (level == Level::kParamsGrads) u.buffers += max_grad;  // staging for the copy out
  if (acts == ActMode::kOnDevice) {
    // Gradients between layers, one group.
    u.buffers += 2 * largest_group * max_act;
  } else if (acts == ActMode::kPartial) {
    // One micro-batch's input and output; what the budget leaves holds activations (the
    // layer's outputs and the gradients between layers first, then checkpoints).
    u.buffers += 2 * max_act;
  } else {
    // Rings for the input, output (and in backward the checkpoint, two gradients) streams.
    u.buffers += 3 * opt.activation_ring * max_act;
  }
  u.buffers += max_working;
  return u;
}

// One fully specified configuration, before simulation.
struct Config {
  Layout layout;
  Placement placement;
  Level level = Level::kNone;
  std::array<TierUse, kNumTiers> tiers;
  int64_t device_peak = 0;
};

// Places host/NVMe homes; false with a reason when host + NVMe cannot hold them.
bool PlaceOffDevice(const ModelDesc& m, const HardwareProfile& hw, const PlannerOptions& opt,
                    int workers, Config* c, std::string* reason) {
  Placement& p = c->placement;
  const int layers = static_cast<int>(m.layers.size());
  for (auto& v : p.home) v.assign(layers, Tier::kDevice);
  int64_t max_fetch = 0, max_grad = 0, max_opt = 0, max_act_layer = 0;
  for (const LayerDesc& d : m.layers) {
    max_fetch = std::max(max_fetch, ParamFetchBytes(d));
    max_grad = std::max(max_grad, d.bytes[kGrads]);
    max_opt = std::max(max_opt, OptimizerStateBytes(d));
    max_act_layer = std::max(max_act_layer, d.bytes[kActs]);
  }
  // Gradients pass through host buffers on their way to the optimizer; with several groups
  // per replica, every layer's partial sum waits there for the last group.
  int64_t grad_staging = 0;
  if (!p.optimizer_on_device) {
    grad_staging = c->layout.par.groups > 1 && !p.grads_resident ? m.TotalBytes()[kGrads]
                                                                 : 2 * workers * max_grad;
  }
  // Items that live on the host if there is room, else on NVMe, in order of priority:
  // parameters (read twice a step), then checkpoints (last layers first: read back soonest),
  // then optimizer state.
  struct Item {
    int cls;  // kMaster stands for master + m + v
    int layer;
    int64_t bytes;
  };
  std::vector<Item> items;
  if (!p.params_resident) {
    for (int l = 0; l < layers; ++l) items.push_back({kParams, l, m.layers[l].bytes[kParams]});
  }
  if (!p.activations_on_device) {
    for (int l = layers - 1; l >= 0; --l) items.push_back({kActs, l, m.layers[l].bytes[kActs]});
  }
  if (!p.optimizer_on_device) {
    for (int l = layers - 1; l >= 0; --l) {
      items.push_back({kMaster, l, OptimizerStateBytes(m.layers[l])});
    }
  }
  // AdamW overlapping the backward (DESIGN §2) writes a layer's new master weights and moments
  // beside the current ones until the step's gradient norm is known: they take twice their
  // size in their tier (the second copy is counted as that tier's buffers). The compute copy
  // of the parameters is updated in place: it is the master rounded, so an update the norm
  // rejects is undone by rounding the kept master again.
  auto footprint = [](const Item& i) { return i.cls == kMaster ? 2 * i.bytes : i.bytes; };
  int64_t wanted = grad_staging;
  for (const Item& i : items) wanted += footprint(i);
  const int64_t host_cap = hw.host.UsableBytes();
  const int64_t nvme_cap = hw.nvme.CapacityBytes();
  int64_t staging = grad_staging;
  const bool spills = wanted > host_cap;
  const int read_ahead = std::max(1, opt.optimizer_read_ahead);
  if (spills) {
    staging += 2 * workers * max_fetch + 2 * max_act_layer + read_ahead * max_opt;
  }
  int64_t host_used = staging, nvme_used = 0;
  int64_t host_overlap = 0, nvme_overlap = 0;
  bool any_nvme[kNumTensorClasses] = {};
  for (const Item& i : items) {
    Tier t = Tier::kHost;
    const int64_t bytes = footprint(i);
    if (host_used + bytes > host_cap || (i.cls == kMaster && opt.optimizer_state_on_nvme)) {
      t = Tier::kNvme;
      nvme_used += bytes;
      nvme_overlap += bytes - i.bytes;
      any_nvme[i.cls] = true;
    } else {
      host_used += bytes;
      host_overlap += bytes - i.bytes;
    }
    if (i.cls == kMaster) {
      p.home[kMaster][i.layer] = p.home[kAdamM][i.layer] = p.home[kAdamV][i.layer] = t;
    } else {
      p.home[i.cls][i.layer] = t;
    }
  }
  if (host_used > host_cap || nvme_used > nvme_cap) {
    *reason = absl::StrCat("host and NVMe cannot hold what stays off the devices: ",
                           FormatBytes(wanted), " wanted, host holds ", FormatBytes(host_cap),
                           " and NVMe ", FormatBytes(nvme_cap));
    return false;
  }
  // Staging actually needed.
  staging = grad_staging;
  if (any_nvme[kParams]) staging += 2 * workers * max_fetch;
  if (any_nvme[kActs]) staging += 2 * max_act_layer;
  if (any_nvme[kMaster]) staging += read_ahead * max_opt;
  p.optimizer_read_ahead = any_nvme[kMaster] ? read_ahead : 0;
  // Homes per tier.
  for (int l = 0; l < layers; ++l) {
    for (int cls = 0; cls < kNumTensorClasses; ++cls) {
      const Tier t = p.home[cls][l];
      if (t == Tier::kDevice) continue;
      if (cls == kGrads) continue;  // transient: counted as staging
      c->tiers[static_cast<int>(t)].home[cls] += m.layers[l].bytes[cls];
    }
  }
  if (!p.grads_resident) {
    for (int l = 0; l < layers; ++l) p.home[kGrads][l] = Tier::kHost;
  }
  // Gradients are transient off the device: the host holds only the staging in flight.
  c->tiers[static_cast<int>(Tier::kHost)].home[kGrads] = grad_staging;
  c->tiers[static_cast<int>(Tier::kHost)].buffers = staging - grad_staging + host_overlap;
  c->tiers[static_cast<int>(Tier::kNvme)].buffers = nvme_overlap;
  return true;
}

// Chooses residency for one candidate layout; false with a reason if nothing fits.
bool Configure(const ModelDesc& m, const HardwareProfile& hw, const PlannerOptions& opt,
               int64_t budget, const Layout& layout, int prefetch, Config* out,
               std::string* reason) {
  const int workers = layout.par.stages * layout.par.replicas;
  std::string last_reason;
  for (Level level : {Level::kAll, Level::kParamsGrads, Level::kParams, Level::kNone}) {
    if (level == Level::kAll && layout.par.replicas > 1) continue;  // see docs/planning.md
    for (ActMode acts : {ActMode::kOnDevice, ActMode::kPartial, ActMode::kStreamed}) {
      const bool acts_on_device = acts == ActMode::kOnDevice;
      Config c;
      c.layout = layout;
      c.level = level;
      int64_t peak = 0, worker_ckpt = 0;
      DeviceUse total;
      bool fits = true;
      for (int s = 0; s < layout.par.stages && fits; ++s) {
        for (int r = 0; r < layout.par.replicas; ++r) {
          const DeviceUse u = WorkerDeviceUse(m, layout, s, r, level, acts, opt, prefetch);
          int64_t ckpt = 0;
          for (int l : layout.stage_layers[s]) {
            ckpt += m.layers[l].activation_bytes_per_micro_batch * layout.MicroBatches(r);
          }
          worker_ckpt = std::max(worker_ckpt, ckpt);
          peak = std::max(peak, u.Total());
          for (int cls = 0; cls < kNumTensorClasses; ++cls) total.home[cls] += u.home[cls];
          total.buffers += u.buffers;
          if (u.Total() > budget) {
            fits = false;
            last_reason = absl::StrCat("worker ", layout.Worker(s, r), " needs ",
                                       FormatBytes(u.Total()), " of device memory, budget ",
                                       FormatBytes(budget));
            break;
          }
        }
      }
      if (!fits) continue;
      Placement& p = c.placement;
      p.params_resident = level >= Level::kParams;
      p.grads_resident = level >= Level::kParamsGrads;
      p.optimizer_on_device = level == Level::kAll;
      p.activations_on_device = acts_on_device;
      p.activations_partial = acts == ActMode::kPartial;
      if (p.activations_partial) {
        // What the largest worker's budget leaves holds a group's layer outputs (in the
        // backward: its gradients between layers) first, then checkpoints; the rest go home.
        int64_t group_acts = 0;
        for (int s = 0; s < layout.par.stages; ++s) {
          for (int r = 0; r < layout.par.replicas; ++r) {
            int64_t largest_group = 0, max_act = 0;
            for (int64_t g : layout.group_sizes[r]) largest_group = std::max(largest_group, g);
            for (int l : layout.stage_layers[s]) {
              max_act = std::max(max_act, m.layers[l].activation_bytes_per_micro_batch);
            }
            group_acts = std::max(group_acts, largest_group * max_act);
          }
        }
        const double spare = static_cast<double>(std::max<int64_t>(0, budget - peak));
        p.interlayer_offload_fraction =
            group_acts > 0 ? std::max(0.0, 1.0 - spare / static_cast<double>(group_acts)) : 0.0;
        const double resident = std::max(0.0, spare - static_cast<double>(group_acts));
        p.activation_offload_fraction =
            worker_ckpt > 0 ? std::max(0.0, 1.0 - resident / static_cast<double>(worker_ckpt))
                            : 0.0;
      }
      p.prefetch_distance = p.params_resident ? 0 : prefetch;
      p.param_buffers = p.params_resident ? 0 : prefetch + 1;
      p.grad_buffers = p.grads_resident ? (p.optimizer_on_device ? 0 : 1) : (prefetch == 0 ? 1 : 2);
      p.activation_buffers = acts == ActMode::kStreamed ? 3 * opt.activation_ring : 0;
      if (!PlaceOffDevice(m, hw, opt, workers, &c, &last_reason)) continue;
      TierUse& dev = c.tiers[static_cast<int>(Tier::kDevice)];
      dev.home = total.home;
      dev.buffers = total.buffers;
      dev.capacity = budget * workers;
      c.tiers[static_cast<int>(Tier::kHost)].capacity = hw.host.UsableBytes();
      c.tiers[static_cast<int>(Tier::kNvme)].capacity = hw.nvme.CapacityBytes();
      c.device_peak = peak;
      *out = std::move(c);
      return true;
    }
  }
  *reason = last_reason;
  return false;
}

// Builds the step schedule of a configuration (see schedule.h for the execution rules).
class ScheduleBuilder {
 public:
  ScheduleBuilder(const ModelDesc& m, const Config& c) : m_(m), c_(c), p_(c.placement) {
    const int workers = c.layout.par.stages * c.layout.par.replicas;
    s_.num_workers = workers;
    const int layers = static_cast<int>(m.layers.size());
    fwd_.assign(workers, std::vector<std::vector<int32_t>>(layers));
    bwd_.assign(workers, std::vector<std::vector<int32_t>>(layers));
    grad_out_.assign(layers, {});
    positions_.assign(workers, {});
    grad_positions_.assign(workers, {});
  }

  Schedule Build() {
    Forward();
    Backward();
    Optimizer();
    Op end;
    end.kind = OpKind::kWait;
    end.lane = Lane::kControl;
    end.label = "step end";
    for (const Op& op : s_.ops) end.deps.push_back(op.id);
    s_.Add(std::move(end));
    return std::move(s_);
  }

 private:
  const Layout& layout() const { return c_.layout; }
  int Groups(int r) const { return static_cast<int>(layout().group_sizes[r].size()); }

  // Prefetch of layer l's parameters for the compute op at the worker's next position.
  int32_t Prefetch(int w, int l) {
    std::vector<int32_t>& pos = positions_[w];
    const int slots = p_.param_buffers;
    const int index = static_cast<int>(pos.size());
    Op h2d;
    h2d.kind = OpKind::kTransfer;
    h2d.worker = w;
    h2d.lane = Lane::kHostToDevice;
    h2d.layer = l;
    h2d.tensor = TensorClass::kParams;
    h2d.src = Tier::kHost;
    h2d.dst = Tier::kDevice;
    h2d.bytes = ParamFetchBytes(m_.layers[l]);
    h2d.host_calls = m_.layers[l].tensors;
    h2d.slot = index % slots;
    h2d.label = absl::StrCat("prefetch params ", m_.layers[l].name);
    if (index >= slots) h2d.deps.push_back(releases_[w][index - slots]);
    if (p_.home[kParams][l] == Tier::kNvme) {
      Op read;
      read.kind = OpKind::kTransfer;
      read.lane = Lane::kNvmeParams;
      read.worker = w;  // the worker's own host queue
      read.layer = l;
      read.tensor = TensorClass::kParams;
      read.src = Tier::kNvme;
      read.dst = Tier::kHost;
      read.bytes = m_.layers[l].bytes[kParams];
      read.label = absl::StrCat("read params ", m_.layers[l].name, " for worker-", w);
      // Two host staging slots per worker.
      if (nvme_param_reads_[w].size() >= 2) {
        read.deps.push_back(nvme_param_h2d_[w][nvme_param_reads_[w].size() - 2]);
      }
      nvme_param_reads_[w].push_back(s_.Add(std::move(read)));
      h2d.deps.push_back(nvme_param_reads_[w].back());
    }
    const int32_t id = s_.Add(std::move(h2d));
    if (p_.home[kParams][l] == Tier::kNvme) nvme_param_h2d_[w].push_back(id);
    pos.push_back(id);
    return id;
  }

  void Release(int w, int l, int32_t compute) {
    Op rel;
    rel.kind = OpKind::kRelease;
    rel.worker = w;
    rel.lane = Lane::kControl;
    rel.layer = l;
    rel.tensor = TensorClass::kParams;
    rel.slot = (static_cast<int>(releases_[w].size())) % p_.param_buffers;
    rel.deps = {compute};
    rel.label = absl::StrCat("release params ", m_.layers[l].name);
    releases_[w].push_back(s_.Add(std::move(rel)));
  }

  // Memstore calls of a compute op's activation streams: one per micro-batch streamed in
  // each direction (partial offload: the share that goes home).
  int64_t StreamCalls(const Op& op) const {
    const double per_mb = static_cast<double>(std::max<int64_t>(1, op.micro_batches));
    int64_t calls = 0;
    for (int64_t bytes : {op.activation_in_bytes, op.activation_out_bytes}) {
      if (bytes <= 0 || op.layer < 0) continue;
      const double mb_bytes =
          static_cast<double>(std::max<int64_t>(1, Act(op.layer, 1)));
      calls += static_cast<int64_t>(std::ceil(std::min(per_mb, bytes / mb_bytes)));
    }
    return calls;
  }

  Op Compute(int w, int l, int g, int64_t mbs, Phase phase) {
    const LayerDesc& d = m_.layers[l];
    Op op;
    op.kind = OpKind::kCompute;
    op.worker = w;
    op.lane = Lane::kCompute;
    op.layer = l;
    op.group = g;
    op.phase = phase;
    op.micro_batches = mbs;
    const double tokens = static_cast<double>(mbs * m_.micro_batch_size * m_.seq_len);
    op.flops = d.forward_flops_per_token * tokens * (phase == Phase::kForward ? 1 : 3);
    op.label = absl::StrCat(phase == Phase::kForward ? "fwd " : "bwd ", d.name, " g", g);
    return op;
  }

  int64_t Offloaded(int64_t bytes) const {
    return static_cast<int64_t>(static_cast<double>(bytes) * p_.activation_offload_fraction);
  }
  // Partial: the share of a layer's outputs and gradients that does not fit between layers.
  int64_t Interlayer(int64_t bytes) const {
    return static_cast<int64_t>(static_cast<double>(bytes) * p_.interlayer_offload_fraction);
  }

  int64_t Act(int l, int64_t mbs) const {
    if (l < 0 || l >= static_cast<int>(m_.layers.size())) return 0;
    return m_.layers[l].activation_bytes_per_micro_batch * mbs;
  }

  void Forward() {
    const int layers = static_cast<int>(m_.layers.size());
    releases_.assign(s_.num_workers, {});
    nvme_param_reads_.assign(s_.num_workers, {});
    nvme_param_h2d_.assign(s_.num_workers, {});
    int max_groups = 0;
    for (int r = 0; r < layout().par.replicas; ++r) max_groups = std::max(max_groups, Groups(r));
    ckpt_write_.assign(layers, std::vector<int32_t>(max_groups, -1));
    for (int g = 0; g < max_groups; ++g) {
      for (int st = 0; st < layout().par.stages; ++st) {
        const std::vector<int>& sl = layout().stage_layers[st];
        for (int l : sl) {
          for (int r = 0; r < layout().par.replicas; ++r) {
            if (g >= Groups(r)) continue;
            const int w = layout().Worker(st, r);
            const int64_t mbs = layout().group_sizes[r][g];
            Op op = Compute(w, l, g, mbs, Phase::kForward);
            const bool first = l == sl.front(), last = l == sl.back();
            if (p_.activations_partial) {
              // Inputs are on the device (what did not fit comes back); evicted checkpoints
              // go home once. Between pipeline stages the activations still cross.
              op.activation_out_bytes = Offloaded(Act(l + 1, mbs));
              if (l > 0) op.activation_in_bytes = Interlayer(Act(l, mbs));
              if (first && st > 0) op.activation_in_bytes = Act(l, mbs);
              if (last && st + 1 < layout().par.stages) op.activation_out_bytes += Act(l + 1, mbs);
            } else if (!p_.activations_on_device) {
              op.activation_in_bytes = l == 0 ? m_.layers[0].activation_bytes_per_micro_batch * mbs
                                              : Act(l, mbs);
              op.activation_out_bytes = Act(l + 1, mbs);
            } else {
              if (first && st > 0) op.activation_in_bytes = Act(l, mbs);
              if (last && st + 1 < layout().par.stages) op.activation_out_bytes = Act(l + 1, mbs);
            }
            if (first && st > 0) op.deps.push_back(fwd_[layout().Worker(st - 1, r)][l - 1][g]);
            if (!p_.params_resident) op.deps.push_back(Prefetch(w, l));
            op.host_calls = StreamCalls(op);
            const int32_t id = s_.Add(std::move(op));
            fwd_[w][l].resize(std::max<size_t>(fwd_[w][l].size(), g + 1), -1);
            fwd_[w][l][g] = id;
            if (!p_.params_resident) Release(w, l, id);
          }
          // The checkpoint of layer l + 1 (this layer's output), if its home is NVMe.
          if (l + 1 < layers && p_.home[kActs][l + 1] == Tier::kNvme) {
            Op write;
            write.kind = OpKind::kTransfer;
            write.lane = Lane::kNvmeActivations;
            // One host queue per stage, so stages never wait in each other's queue.
            write.worker = layout().Worker(st, 0);
            write.layer = l + 1;
            write.group = g;
            write.tensor = TensorClass::kActivations;
            write.src = Tier::kHost;
            write.dst = Tier::kNvme;
            for (int r = 0; r < layout().par.replicas; ++r) {
              if (g >= Groups(r)) continue;
              const int64_t bytes = Act(l + 1, layout().group_sizes[r][g]);
              write.bytes += p_.activations_partial ? Offloaded(bytes) : bytes;
              write.deps.push_back(fwd_[layout().Worker(st, r)][l][g]);
            }
            write.label = absl::StrCat("write checkpoint ", m_.layers[l + 1].name, " g", g);
            ckpt_write_[l + 1][g] = s_.Add(std::move(write));
          }
        }
      }
    }
  }

  void Backward() {
    int max_groups = 0;
    for (int r = 0; r < layout().par.replicas; ++r) max_groups = std::max(max_groups, Groups(r));
    // Per stage: checkpoint reads in order and the compute op that consumed each (two host
    // staging slots per stage).
    std::vector<std::vector<int32_t>> reads(layout().par.stages);
    std::vector<std::vector<int32_t>> consumers(layout().par.stages);
    for (int g = max_groups - 1; g >= 0; --g) {
      for (int st = layout().par.stages - 1; st >= 0; --st) {
        const std::vector<int>& sl = layout().stage_layers[st];
        for (auto it = sl.rbegin(); it != sl.rend(); ++it) {
          const int l = *it;
          int32_t read = -1;
          if (!p_.activations_on_device && p_.home[kActs][l] == Tier::kNvme) {
            Op op;
            op.kind = OpKind::kTransfer;
            op.lane = Lane::kNvmeActivations;
            op.worker = layout().Worker(st, 0);  // the stage's host queue
            op.layer = l;
            op.group = g;
            op.tensor = TensorClass::kActivations;
            op.src = Tier::kNvme;
            op.dst = Tier::kHost;
            for (int r = 0; r < layout().par.replicas; ++r) {
              if (g >= Groups(r)) continue;
              const int64_t bytes = Act(l, layout().group_sizes[r][g]);
              op.bytes += p_.activations_partial ? Offloaded(bytes) : bytes;
            }
            if (ckpt_write_[l][g] >= 0) op.deps.push_back(ckpt_write_[l][g]);
            std::vector<int32_t>& ckpt_reads = reads[st];
            std::vector<int32_t>& ckpt_consumers = consumers[st];
            if (ckpt_reads.size() >= 2 && ckpt_consumers[ckpt_reads.size() - 2] >= 0) {
              op.deps.push_back(ckpt_consumers[ckpt_reads.size() - 2]);
            }
            op.label = absl::StrCat("read checkpoint ", m_.layers[l].name, " g", g);
            read = s_.Add(std::move(op));
            ckpt_reads.push_back(read);
            ckpt_consumers.push_back(-1);
          }
          int32_t last_compute = -1;
          for (int r = 0; r < layout().par.replicas; ++r) {
            if (g >= Groups(r)) continue;
            const int w = layout().Worker(st, r);
            const int64_t mbs = layout().group_sizes[r][g];
            Op op = Compute(w, l, g, mbs, Phase::kBackward);
            const bool first = l == sl.front(), last = l == sl.back();
            if (p_.activations_partial) {
              // Gradients stay on the device (what did not fit crosses out and back); the
              // checkpoints that went home come back.
              op.activation_in_bytes = Offloaded(Act(l, mbs)) + Interlayer(Act(l, mbs));
              op.activation_out_bytes = Interlayer(Act(l, mbs));
              if (last && st + 1 < layout().par.stages) op.activation_in_bytes += Act(l + 1, mbs);
              if (first && st > 0) op.activation_out_bytes = Act(l, mbs);
            } else if (!p_.activations_on_device) {
              op.activation_in_bytes = Act(l, mbs) + (l + 1 < static_cast<int>(m_.layers.size())
                                                          ? Act(l + 1, mbs)
                                                          : 0);
              op.activation_out_bytes = l > 0 ? Act(l, mbs) : 0;
            } else {
              if (last && st + 1 < layout().par.stages) op.activation_in_bytes = Act(l + 1, mbs);
              if (first && st > 0) op.activation_out_bytes = Act(l, mbs);
            }
            if (last && st + 1 < layout().par.stages) {
              op.deps.push_back(bwd_[layout().Worker(st + 1, r)][l + 1][g]);
            }
            if (read >= 0) op.deps.push_back(read);
            if (!p_.params_resident) op.deps.push_back(Prefetch(w, l));
            // Gradient buffers: wait for the copy out grad_buffers layers back.
            std::vector<int32_t>& gp = grad_positions_[w];
            const size_t gbufs = static_cast<size_t>(std::max(1, p_.grad_buffers));
            if (!p_.grads_resident && gp.size() >= gbufs) op.deps.push_back(gp[gp.size() - gbufs]);
            op.host_calls = StreamCalls(op);
            const int32_t id = s_.Add(std::move(op));
            bwd_[w][l].resize(std::max<size_t>(bwd_[w][l].size(), g + 1), -1);
            bwd_[w][l][g] = id;
            last_compute = id;
            if (!p_.params_resident) Release(w, l, id);
            const bool final_group = g == 0;
            if (p_.optimizer_on_device && final_group) {
              Op upd;
              upd.kind = OpKind::kOptimizer;
              upd.worker = w;
              upd.lane = Lane::kCompute;
              upd.layer = l;
              upd.params = m_.layers[l].parameters;
              upd.bytes = upd.params * m_.OptimizerBytesPerParam();
              upd.deps = {id};
              upd.label = absl::StrCat("adamw ", m_.layers[l].name, " on worker-", w);
              s_.Add(std::move(upd));
            } else if (!p_.optimizer_on_device && (!p_.grads_resident || final_group)) {
              Op out;
              out.kind = OpKind::kTransfer;
              out.worker = w;
              out.lane = Lane::kDeviceToHost;
              out.layer = l;
              out.group = g;
              out.tensor = TensorClass::kGrads;
              out.src = Tier::kDevice;
              out.dst = Tier::kHost;
              out.bytes = m_.layers[l].bytes[kGrads];
              out.host_calls = m_.layers[l].tensors;
              out.deps = {id};
              out.label = absl::StrCat("offload grads ", m_.layers[l].name, " g", g);
              const int32_t out_id = s_.Add(std::move(out));
              grad_out_[l].push_back(out_id);
              gp.push_back(out_id);
            }
          }
          if (read >= 0) consumers[st].back() = last_compute;
          if (g == 0 && !p_.optimizer_on_device) optimizer_order_.push_back(l);
        }
      }
    }
  }

  void Optimizer() {
    if (p_.optimizer_on_device) return;
    std::vector<int32_t> state_writes;  // in optimizer order, for read-ahead slots
    for (int l : optimizer_order_) {
      const LayerDesc& d = m_.layers[l];
      std::vector<int32_t> deps = grad_out_[l];
      if (grad_out_[l].size() > 1) {
        Op red;
        red.kind = OpKind::kReduce;
        red.lane = Lane::kHostCpu;
        red.layer = l;
        red.bytes = (static_cast<int64_t>(grad_out_[l].size()) + 1) * d.bytes[kGrads];
        red.deps = grad_out_[l];
        red.label = absl::StrCat("reduce grads ", d.name, " (", grad_out_[l].size(), " parts)");
        deps = {s_.Add(std::move(red))};
      }
      const bool state_on_nvme = p_.home[kAdamM][l] == Tier::kNvme;
      if (state_on_nvme) {
        Op read;
        read.kind = OpKind::kTransfer;
        read.lane = Lane::kNvmeOptimizer;
        read.layer = l;
        read.tensor = TensorClass::kAdamM;  // master + m + v
        read.src = Tier::kNvme;
        read.dst = Tier::kHost;
        read.bytes = OptimizerStateBytes(d);
        const int ahead = std::max(1, p_.optimizer_read_ahead);
        if (static_cast<int>(state_writes.size()) >= ahead) {
          read.deps.push_back(state_writes[state_writes.size() - ahead]);
        }
        read.label = absl::StrCat("read optimizer state ", d.name);
        deps.push_back(s_.Add(std::move(read)));
      }
      Op upd;
      upd.kind = OpKind::kOptimizer;
      upd.lane = Lane::kHostCpu;
      upd.layer = l;
      upd.params = d.parameters;
      upd.bytes = upd.params * m_.OptimizerBytesPerParam();
      // Per tensor: read parameter, gradient, m, v; write parameter, m, v.
      upd.host_calls = 7 * d.tensors;
      upd.deps = deps;
      upd.label = absl::StrCat("adamw ", d.name, " on host");
      const int32_t upd_id = s_.Add(std::move(upd));
      if (state_on_nvme) {
        Op write;
        write.kind = OpKind::kTransfer;
        write.lane = Lane::kNvmeWriteBack;
        write.layer = l;
        write.tensor = TensorClass::kAdamM;
        write.src = Tier::kHost;
        write.dst = Tier::kNvme;
        write.bytes = OptimizerStateBytes(d);
        write.deps = {upd_id};
        write.label = absl::StrCat("write optimizer state ", d.name);
        state_writes.push_back(s_.Add(std::move(write)));
      }
      if (p_.home[kParams][l] == Tier::kNvme) {
        Op write;
        write.kind = OpKind::kTransfer;
        write.lane = Lane::kNvmeWriteBack;
        write.layer = l;
        write.tensor = TensorClass::kParams;
        write.src = Tier::kHost;
        write.dst = Tier::kNvme;
        write.bytes = d.bytes[kParams];
        write.deps = {upd_id};
        write.label = absl::StrCat("write params ", d.name);
        s_.Add(std::move(write));
      } else if (p_.params_resident) {
        // The new compute copy goes to every worker that keeps this layer.
        for (int st = 0; st < layout().par.stages; ++st) {
          const auto& sl = layout().stage_layers[st];
          if (std::find(sl.begin(), sl.end(), l) == sl.end()) continue;
          for (int r = 0; r < layout().par.replicas; ++r) {
            Op up;
            up.kind = OpKind::kTransfer;
            up.worker = layout().Worker(st, r);
            up.lane = Lane::kHostToDevice;
            up.layer = l;
            up.tensor = TensorClass::kParams;
            up.src = Tier::kHost;
            up.dst = Tier::kDevice;
            up.bytes = ParamFetchBytes(d);
            up.deps = {upd_id};
            up.label = absl::StrCat("upload new params ", d.name);
            s_.Add(std::move(up));
          }
        }
      }
    }
  }

  const ModelDesc& m_;
  const Config& c_;
  const Placement& p_;
  Schedule s_;
  // [worker][layer][group] → compute op.
  std::vector<std::vector<std::vector<int32_t>>> fwd_, bwd_;
  std::vector<std::vector<int32_t>> grad_out_;        // [layer] → gradient copies out
  std::vector<std::vector<int32_t>> positions_;       // [worker] → prefetch per compute op
  std::vector<std::vector<int32_t>> releases_;        // [worker] → param releases in order
  std::vector<std::vector<int32_t>> grad_positions_;  // [worker] → gradient copies in order
  std::vector<std::vector<int32_t>> nvme_param_reads_, nvme_param_h2d_;
  std::vector<std::vector<int32_t>> ckpt_write_;  // [layer][group]
  std::vector<int> optimizer_order_;
};

struct Evaluated {
  Config config;
  Schedule schedule;
  SimResult sim;
};

absl::StatusOr<Evaluated> Evaluate(const ModelDesc& m, const HardwareProfile& hw,
                                   Config config) {
  Evaluated e;
  e.schedule = ScheduleBuilder(m, config).Build();
  ASSIGN_OR_RETURN(e.sim, Simulate(e.schedule, hw, m.bf16));
  e.config = std::move(config);
  return e;
}

double LinkBytes(const SimResult& sim) {
  double total = 0;
  for (const char* key : {"host->device", "device->host"}) {
    auto it = sim.bytes_moved.find(key);
    if (it != sim.bytes_moved.end()) total += static_cast<double>(it->second);
  }
  return total;
}

// More groups shrink the pipeline bubble but fetch every stage's parameters once per group.
constexpr int64_t kMaxGroups = 32;

std::vector<Parallelism> Parallelisms(const ModelDesc& m, int workers) {
  std::vector<Parallelism> out;
  const int decoders = static_cast<int>(m.layers.size()) - 2;
  for (int stages = 1; stages <= workers; ++stages) {
    if (workers % stages != 0 || stages > std::max(1, decoders)) continue;
    const int replicas = workers / stages;
    const int64_t per_replica = std::max<int64_t>(1, m.micro_batches / replicas);
    if (stages == 1) {
      out.push_back({1, replicas, 1});
      continue;
    }
    // Groups: powers of two up to the replica's micro-batches (at most kMaxGroups).
    const int64_t max_groups = std::min<int64_t>(per_replica, kMaxGroups);
    for (int64_t groups = 1; groups <= max_groups; groups *= 2) {
      out.push_back({stages, replicas, static_cast<int>(groups)});
    }
    if ((max_groups & (max_groups - 1)) != 0) {
      out.push_back({stages, replicas, static_cast<int>(max_groups)});
    }
  }
  return out;
}

// The first layer whose minimal working set (one param buffer, one gradient buffer, one
// micro-batch of activations and intermediates) exceeds the budget, as a why_not message.
std::string TooSmallForLayer(const ModelDesc& m, const PlannerOptions& opt, int64_t budget) {
  for (const LayerDesc& d : m.layers) {
    const int64_t acts = 3 * opt.activation_ring * d.activation_bytes_per_micro_batch;
    const int64_t need =
        ParamFetchBytes(d) + d.bytes[kGrads] + acts + d.working_bytes_per_micro_batch;
    if (need <= budget) continue;
    return absl::StrCat(
        "layer ", d.name, " needs ", FormatBytes(need), " of device memory (parameters ",
        FormatBytes(ParamFetchBytes(d)), ", gradient ", FormatBytes(d.bytes[kGrads]),
        ", activations of one micro-batch of ", m.micro_batch_size, "x", m.seq_len, " tokens ",
        FormatBytes(acts + d.working_bytes_per_micro_batch), "); the device budget is ",
        FormatBytes(budget));
  }
  return "";
}

void Suggest(const ModelDesc& m, const HardwareProfile& hw, Plan* plan) {
  const double binding = plan->sim.binding_busy_fraction;
  if (plan->sim.binding_resource == "device compute" || binding <= 0) return;
  double compute = 0;
  for (const ResourceUsage& u : plan->sim.resources) {
    if (u.group == "device compute") compute = std::max(compute, u.busy_fraction);
  }
  const double ratio = compute > 0 ? binding / compute : 0;
  const int64_t accum = static_cast<int64_t>(std::ceil(m.micro_batches * ratio / 0.9));
  plan->suggestions.push_back(absl::StrFormat(
      "%s binds (busy %.0f%%, devices %.0f%%): its work per step barely grows with the batch, "
      "so more tokens per step hide it — try train.grad_accum_steps >= %d (now %d)",
      plan->sim.binding_resource, 100 * binding, 100 * compute, accum, m.micro_batches));
  (void)hw;
}

}  // namespace

std::string Parallelism::Name() const {
  if (stages == 1) return replicas == 1 ? "single worker" : absl::StrCat("data-parallel x", replicas);
  const std::string g = absl::StrCat(groups, groups == 1 ? " group" : " groups");
  if (replicas == 1) return absl::StrCat("pipeline x", stages, ", ", g);
  return absl::StrCat("hybrid ", stages, " stages x ", replicas, " replicas, ", g);
}

int64_t TierUse::Total() const {
  return std::accumulate(home.begin(), home.end(), buffers);
}

absl::Status AdmissionStatus(const Plan& plan) {
  if (plan.fits) return absl::OkStatus();
  return absl::ResourceExhaustedError(plan.why_not);
}

absl::StatusOr<Plan> PlanJob(const ModelDesc& m, const HardwareProfile& hw,
                             const PlannerOptions& opt) {
  if (opt.workers < 1 || opt.workers > hw.device.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("workers: ", opt.workers, " must be between 1 and the ", hw.device.count,
                     " devices of hardware profile ", hw.name));
  }
  if (opt.device_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("device budget: ", opt.device_budget_bytes, " must be >= 0"));
  }
  Plan plan;
  plan.hardware = hw.name;
  plan.workers = opt.workers;
  plan.parameters = m.parameters;
  plan.tokens_per_step = m.TokensPerStep();
  plan.state_bytes = m.StateBytes();
  plan.activation_bytes = m.TotalBytes()[kActs];
  plan.device_budget_bytes =
      opt.device_budget_bytes > 0 ? opt.device_budget_bytes : hw.device.BudgetBytes();
  const int64_t budget = plan.device_budget_bytes;
  plan.node_capacity_bytes =
      budget * opt.workers + hw.host.UsableBytes() + hw.nvme.CapacityBytes();
  int64_t max_grad = 0;
  for (const LayerDesc& d : m.layers) max_grad = std::max(max_grad, d.bytes[kGrads]);
  const ClassBytes total = m.TotalBytes();
  plan.bytes_needed = total[kParams] + total[kMaster] + total[kAdamM] + total[kAdamV] +
                      total[kActs] + std::min(total[kGrads], 2 * opt.workers * max_grad);

  // 1. Every layer must fit the device on its own.
  const std::string layer_problem = TooSmallForLayer(m, opt, budget);
  if (!layer_problem.empty()) {
    plan.why_not = layer_problem;
    plan.suggestions.push_back(
        "lower train.micro_batch_size or train.seq_len if activations dominate, or plan for a "
        "device with more memory");
    return plan;
  }
  // 2. Everything must fit the node's tiers together.
  if (plan.bytes_needed > plan.node_capacity_bytes) {
    plan.why_not = absl::StrCat(
        "needs ", FormatBytes(plan.bytes_needed), " across tiers, node has ",
        FormatBytes(plan.node_capacity_bytes), " (devices ", opt.workers, " x ",
        FormatBytes(budget), ", host ", FormatBytes(hw.host.UsableBytes()), ", NVMe ",
        FormatBytes(hw.nvme.CapacityBytes()), "); training state ", FormatBytes(plan.state_bytes),
        ", activation checkpoints ", FormatBytes(plan.activation_bytes));
    plan.suggestions.push_back(absl::StrCat(
        "add NVMe capacity (", FormatBytes(plan.bytes_needed - plan.node_capacity_bytes),
        " short), use a smaller model, or fewer tokens per step (checkpoints grow with "
        "micro_batch_size x grad_accum_steps x seq_len)"));
    return plan;
  }
  // 3. Candidates: every parallelism, each at its best residency; simulate; keep the fastest.
  const int base_prefetch = opt.prefetch_distances.empty() ? 1 : opt.prefetch_distances.front();
  std::optional<Evaluated> best;
  for (const Parallelism& par : Parallelisms(m, opt.workers)) {
    if ((opt.stages > 0 && par.stages != opt.stages) ||
        (opt.groups > 0 && par.groups != opt.groups)) {
      continue;
    }
    Candidate cand;
    cand.parallelism = par;
    const Layout layout = MakeLayout(m, par);
    if (m.micro_batches < par.replicas) {
      cand.reason = absl::StrCat("train.grad_accum_steps ", m.micro_batches, " < ",
                                 par.replicas, " replicas");
      plan.candidates.push_back(cand);
      continue;
    }
    Config config;
    int prefetch = std::max(base_prefetch, 2);
    std::string reason;
    bool ok = Configure(m, hw, opt, budget, layout, prefetch, &config, &reason);
    if (!ok && prefetch != base_prefetch) {
      prefetch = base_prefetch;
      ok = Configure(m, hw, opt, budget, layout, prefetch, &config, &reason);
    }
    if (!ok && prefetch != 0) {
      // No room to read ahead: each layer's parameters are read when it starts.
      std::string reason0;
      prefetch = 0;
      ok = Configure(m, hw, opt, budget, layout, prefetch, &config, &reason0);
    }
    if (!ok) {
      cand.reason = reason;
      plan.candidates.push_back(cand);
      continue;
    }
    ASSIGN_OR_RETURN(Evaluated e, Evaluate(m, hw, std::move(config)));
    cand.feasible = true;
    cand.step_time_s = e.sim.step_time_s;
    cand.tokens_per_s = m.TokensPerStep() / e.sim.step_time_s;
    cand.binding_resource = e.sim.binding_resource;
    cand.link_bytes_per_param = LinkBytes(e.sim) / static_cast<double>(m.parameters);
    plan.candidates.push_back(cand);
    if (!best || e.sim.step_time_s < best->sim.step_time_s * (1 - 1e-6) ||
        (e.sim.step_time_s <= best->sim.step_time_s * (1 + 1e-6) &&
         e.sim.nvme_bytes_written < best->sim.nvme_bytes_written)) {
      best = std::move(e);
    }
  }
  if (!best) {
    plan.why_not = "no parallelism fits: ";
    for (const Candidate& c : plan.candidates) {
      absl::StrAppend(&plan.why_not, c.parallelism.Name(), ": ", c.reason, "; ");
    }
    plan.suggestions.push_back(
        "lower train.micro_batch_size, train.seq_len or grad_accum_steps, or add host RAM/NVMe");
    return plan;
  }
  // 4. Prefetch distance for the winner.
  if (!best->config.placement.params_resident) {
    for (int k : opt.prefetch_distances) {
      if (k == best->config.placement.prefetch_distance) continue;
      Config config;
      std::string reason;
      if (!Configure(m, hw, opt, budget, best->config.layout, k, &config, &reason)) continue;
      if (config.level != best->config.level) continue;
      ASSIGN_OR_RETURN(Evaluated e, Evaluate(m, hw, std::move(config)));
      // A deeper prefetch must buy 0.5% to be worth its buffer.
      const bool deeper = k > best->config.placement.prefetch_distance;
      if (e.sim.step_time_s < best->sim.step_time_s * (deeper ? 0.995 : 1.0005)) {
        best = std::move(e);
      }
    }
  }
  plan.fits = true;
  plan.parallelism = best->config.layout.par;
  plan.placement = best->config.placement;
  plan.tiers = best->config.tiers;
  plan.device_peak_bytes = best->config.device_peak;
  plan.sim = std::move(best->sim);
  plan.schedule = std::move(best->schedule);
  plan.tokens_per_s = m.TokensPerStep() / plan.sim.step_time_s;
  const double peak = (m.bf16 ? hw.device.peak_bf16_flops : hw.device.peak_fp32_flops);
  plan.flops_utilization = m.StepFlops() / (opt.workers * peak * plan.sim.step_time_s);
  plan.nvme_bytes_written_per_day =
      static_cast<int64_t>(plan.sim.nvme_bytes_written * (86400.0 / plan.sim.step_time_s));
  Suggest(m, hw, &plan);
  return plan;
}

}  // namespace lumen
