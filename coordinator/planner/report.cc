#include "coordinator/planner/report.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/units.h"

namespace lumen {
namespace {


std::string Num(double v) { return absl::StrFormat("%.6g", v); }

// Busiest member of each resource group, in a fixed order.
std::vector<std::pair<std::string, double>> GroupBusy(const SimResult& sim) {
  std::map<std::string, double> busiest;
  for (const ResourceUsage& u : sim.resources) {
    busiest[u.group] = std::max(busiest[u.group], u.busy_fraction);
  }
  std::vector<std::pair<std::string, double>> out(busiest.begin(), busiest.end());
  std::stable_sort(out.begin(), out.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

std::string PlacementText(const Plan& plan) {
  const Placement& p = plan.placement;
  std::vector<std::string> parts;
  auto homes = [&](TensorClass c) {
    std::map<Tier, int> count;
    for (Tier t : p.home[static_cast<int>(c)]) ++count[t];
    std::vector<std::string> out;
    for (const auto& [t, n] : count) {
      out.push_back(count.size() == 1 ? TierName(t) : absl::StrCat(TierName(t), " (", n, " layers)"));
    }
    return absl::StrJoin(out, " + ");
  };
  parts.push_back(p.params_resident
                      ? "params resident on device"
                  : p.prefetch_distance == 0
                      ? absl::StrCat("params home ", homes(TensorClass::kParams),
                                     ", read on demand (no room to read ahead: 1 device buffer)")
                      : absl::StrCat("params home ", homes(TensorClass::kParams),
                                     ", streamed with prefetch distance ", p.prefetch_distance,
                                     " (", p.param_buffers, " device buffers)"));
  parts.push_back(p.grads_resident ? "grads accumulate on device"
                                   : "grads streamed to host as each layer finishes");
  parts.push_back(p.optimizer_on_device
                      ? "optimizer on device"
                      : absl::StrCat("optimizer on host CPU, state home ",
                                     homes(TensorClass::kAdamM),
                                     p.optimizer_read_ahead > 0
                                         ? absl::StrCat(" (read ahead ", p.optimizer_read_ahead,
                                                        " layers)")
                                         : ""));
  parts.push_back(
      p.activations_on_device
          ? "activation checkpoints on device"
          : p.activations_partial
                ? absl::StrFormat("activation checkpoints %.0f%% offloaded (the rest stay on "
                                  "device), home %s",
                                  100 * p.activation_offload_fraction,
                                  homes(TensorClass::kActivations))
                : absl::StrCat("activation checkpoints offloaded, home ",
                               homes(TensorClass::kActivations)));
  return absl::StrJoin(parts, "\n                    ");
}

}  // namespace

std::string PlanText(const std::string& job_name, const ModelDesc& m, const HardwareProfile& hw,
                     const Plan& plan) {
  std::string s;
  absl::StrAppendFormat(&s, "job %s on %s (%s), %d worker%s\n", job_name, hw.name, hw.source,
                        plan.workers, plan.workers == 1 ? "" : "s");
  absl::StrAppendFormat(&s, "  parameters        %.2f B (%d), %s\n", plan.parameters / 1e9,
                        plan.parameters, m.bf16 ? "bf16" : "fp32");
  absl::StrAppendFormat(&s,
                        "  tokens per step   %d (micro_batch_size %d x seq_len %d x "
                        "grad_accum_steps %d)\n",
                        plan.tokens_per_step, m.micro_batch_size, m.seq_len, m.micro_batches);
  absl::StrAppendFormat(&s,
                        "  training state    %s = %.3g TB (%.1f B/param), activation "
                        "checkpoints %s\n",
                        FormatBytes(plan.state_bytes), plan.state_bytes / 1e12,
                        static_cast<double>(plan.state_bytes) / plan.parameters,
                        FormatBytes(plan.activation_bytes));
  if (!plan.fits) {
    absl::StrAppend(&s, "  fits              NO: ", plan.why_not, "\n");
    for (const std::string& t : plan.suggestions) absl::StrAppend(&s, "  to change         ", t, "\n");
    return s;
  }
  absl::StrAppendFormat(&s, "  fits              yes: peak %s of the %s device budget\n",
                        FormatBytes(plan.device_peak_bytes), FormatBytes(plan.device_budget_bytes));
  absl::StrAppend(&s, "  parallelism       ", plan.parallelism.Name(), "\n");
  absl::StrAppend(&s, "  placement         ", PlacementText(plan), "\n");
  absl::StrAppendFormat(&s, "  bytes by tier     %-12s %12s %12s %12s\n", "", "device", "host",
                        "nvme");
  auto row = [&](const std::string& name, auto get) {
    absl::StrAppendFormat(&s, "                    %-12s %12s %12s %12s\n", name,
                          FormatBytes(get(plan.tiers[0])), FormatBytes(get(plan.tiers[1])),
                          FormatBytes(get(plan.tiers[2])));
  };
  for (int c = 0; c < kNumTensorClasses; ++c) {
    row(TensorClassName(static_cast<TensorClass>(c)), [c](const TierUse& t) { return t.home[c]; });
  }
  row("buffers", [](const TierUse& t) { return t.buffers; });
  row("total", [](const TierUse& t) { return t.Total(); });
  row("capacity", [](const TierUse& t) { return t.capacity; });
  const SimResult& sim = plan.sim;
  absl::StrAppendFormat(&s,
                        "  predicted step    %.4g s, %.0f tokens/s, device busy %.1f%%, "
                        "%.1f%% of peak FLOP/s\n",
                        sim.step_time_s, plan.tokens_per_s, 100 * sim.device_busy_fraction,
                        100 * plan.flops_utilization);
  absl::StrAppendFormat(&s, "  binding resource  %s (%.1f%% busy)\n", sim.binding_resource,
                        100 * sim.binding_busy_fraction);
  std::vector<std::string> busy;
  for (const auto& [g, f] : GroupBusy(sim)) busy.push_back(absl::StrFormat("%s %.0f%%", g, 100 * f));
  absl::StrAppend(&s, "  busy              ", absl::StrJoin(busy, ", "), "\n");
  std::vector<std::string> moved;
  for (const auto& [k, v] : sim.bytes_moved) moved.push_back(absl::StrCat(k, " ", FormatBytes(v)));
  absl::StrAppend(&s, "  moved per step    ", moved.empty() ? "nothing" : absl::StrJoin(moved, ", "),
                  "\n");
  absl::StrAppendFormat(&s, "  NVMe written      %s per step, %s per day\n",
                        FormatBytes(sim.nvme_bytes_written),
                        FormatBytes(plan.nvme_bytes_written_per_day));
  for (const std::string& t : plan.suggestions) absl::StrAppend(&s, "  to change         ", t, "\n");
  if (plan.candidates.size() > 1) {
    absl::StrAppend(&s, "  candidates\n");
    for (const Candidate& c : plan.candidates) {
      if (c.feasible) {
        absl::StrAppendFormat(&s, "    %-40s %10.2f s %8.0f tokens/s  %5.1f link B/param  %s\n",
                              c.parallelism.Name(), c.step_time_s, c.tokens_per_s,
                              c.link_bytes_per_param, c.binding_resource);
      } else {
        absl::StrAppendFormat(&s, "    %-40s does not fit: %s\n", c.parallelism.Name(), c.reason);
      }
    }
  }
  return s;
}

std::string PlanJson(const std::string& job_name, const ModelDesc& m, const HardwareProfile& hw,
                     const Plan& plan) {
  std::vector<std::string> f;
  f.push_back(absl::StrCat("\"job\":", JsonQuote(job_name)));
  f.push_back(absl::StrCat("\"hardware\":", JsonQuote(hw.name)));
  f.push_back(absl::StrCat("\"workers\":", plan.workers));
  f.push_back(absl::StrCat("\"fits\":", plan.fits ? "true" : "false"));
  if (!plan.fits) f.push_back(absl::StrCat("\"why_not\":", JsonQuote(plan.why_not)));
  std::vector<std::string> sugg;
  for (const std::string& t : plan.suggestions) sugg.push_back(JsonQuote(t));
  f.push_back(absl::StrCat("\"suggestions\":[", absl::StrJoin(sugg, ","), "]"));
  f.push_back(absl::StrCat("\"parameters\":", plan.parameters));
  f.push_back(absl::StrCat("\"precision\":", m.bf16 ? "\"bf16\"" : "\"fp32\""));
  f.push_back(absl::StrCat("\"tokens_per_step\":", plan.tokens_per_step));
  f.push_back(absl::StrCat("\"state_bytes\":", plan.state_bytes));
  f.push_back(absl::StrCat("\"activation_bytes\":", plan.activation_bytes));
  f.push_back(absl::StrCat("\"bytes_needed\":", plan.bytes_needed));
  f.push_back(absl::StrCat("\"node_capacity_bytes\":", plan.node_capacity_bytes));
  f.push_back(absl::StrCat("\"device_budget_bytes\":", plan.device_budget_bytes));
  if (plan.fits) {
    const Placement& p = plan.placement;
    f.push_back(absl::StrCat("\"parallelism\":{\"name\":", JsonQuote(plan.parallelism.Name()),
                             ",\"stages\":", plan.parallelism.stages,
                             ",\"replicas\":", plan.parallelism.replicas,
                             ",\"groups\":", plan.parallelism.groups, "}"));
    f.push_back(absl::StrCat(
        "\"placement\":{\"params_resident\":", p.params_resident ? "true" : "false",
        ",\"grads_resident\":", p.grads_resident ? "true" : "false",
        ",\"optimizer\":", p.optimizer_on_device ? "\"device\"" : "\"host\"",
        ",\"activations_offloaded\":", p.activations_on_device ? "false" : "true",
        ",\"activation_offload_fraction\":",
        Num(p.activations_on_device ? 0.0
                                    : (p.activations_partial ? p.activation_offload_fraction
                                                             : 1.0)),
        ",\"prefetch_distance\":", p.prefetch_distance, ",\"param_buffers\":", p.param_buffers,
        ",\"grad_buffers\":", p.grad_buffers, ",\"activation_buffers\":", p.activation_buffers,
        ",\"optimizer_read_ahead\":", p.optimizer_read_ahead, "}"));
    std::vector<std::string> tiers;
    for (int t = 0; t < kNumTiers; ++t) {
      std::vector<std::string> cls;
      for (int c = 0; c < kNumTensorClasses; ++c) {
        cls.push_back(absl::StrCat(JsonQuote(TensorClassName(static_cast<TensorClass>(c))), ":",
                                   plan.tiers[t].home[c]));
      }
      cls.push_back(absl::StrCat("\"buffers\":", plan.tiers[t].buffers));
      cls.push_back(absl::StrCat("\"total\":", plan.tiers[t].Total()));
      cls.push_back(absl::StrCat("\"capacity\":", plan.tiers[t].capacity));
      tiers.push_back(absl::StrCat(JsonQuote(TierName(static_cast<Tier>(t))), ":{",
                                   absl::StrJoin(cls, ","), "}"));
    }
    f.push_back(absl::StrCat("\"tier_bytes\":{", absl::StrJoin(tiers, ","), "}"));
    f.push_back(absl::StrCat("\"device_peak_bytes\":", plan.device_peak_bytes));
    const SimResult& sim = plan.sim;
    f.push_back(absl::StrCat("\"predicted_step_time_s\":", Num(sim.step_time_s)));
    f.push_back(absl::StrCat("\"tokens_per_s\":", Num(plan.tokens_per_s)));
    f.push_back(absl::StrCat("\"device_busy_fraction\":", Num(sim.device_busy_fraction)));
    f.push_back(absl::StrCat("\"flops_utilization\":", Num(plan.flops_utilization)));
    f.push_back(absl::StrCat("\"binding_resource\":", JsonQuote(sim.binding_resource)));
    f.push_back(absl::StrCat("\"binding_busy_fraction\":", Num(sim.binding_busy_fraction)));
    std::vector<std::string> busy;
    for (const auto& [g, v] : GroupBusy(sim)) busy.push_back(absl::StrCat(JsonQuote(g), ":", Num(v)));
    f.push_back(absl::StrCat("\"resource_busy_fraction\":{", absl::StrJoin(busy, ","), "}"));
    std::vector<std::string> moved;
    for (const auto& [k, v] : sim.bytes_moved) moved.push_back(absl::StrCat(JsonQuote(k), ":", v));
    f.push_back(absl::StrCat("\"bytes_moved\":{", absl::StrJoin(moved, ","), "}"));
    f.push_back(absl::StrCat("\"nvme_bytes_written_per_step\":", sim.nvme_bytes_written));
    f.push_back(absl::StrCat("\"nvme_bytes_written_per_day\":", plan.nvme_bytes_written_per_day));
    f.push_back(absl::StrCat("\"nvme_bytes_read_per_step\":", sim.nvme_bytes_read));
    f.push_back(absl::StrCat("\"schedule_ops\":", plan.schedule.ops.size()));
  }
  std::vector<std::string> cands;
  for (const Candidate& c : plan.candidates) {
    std::string one = absl::StrCat("{\"parallelism\":", JsonQuote(c.parallelism.Name()),
                                   ",\"feasible\":", c.feasible ? "true" : "false");
    if (c.feasible) {
      absl::StrAppend(&one, ",\"step_time_s\":", Num(c.step_time_s),
                      ",\"tokens_per_s\":", Num(c.tokens_per_s),
                      ",\"binding_resource\":", JsonQuote(c.binding_resource),
                      ",\"link_bytes_per_param\":", Num(c.link_bytes_per_param));
    } else {
      absl::StrAppend(&one, ",\"reason\":", JsonQuote(c.reason));
    }
    cands.push_back(one + "}");
  }
  f.push_back(absl::StrCat("\"candidates\":[", absl::StrJoin(cands, ","), "]"));
  return absl::StrCat("{", absl::StrJoin(f, ","), "}");
}

}  // namespace lumen
