#include "client/commands.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/data_prepare.h"
#include "client/export.h"
#include "client/generate.h"
#include "client/plan_command.h"
#include "common/paths.h"
#include "common/units.h"
#include "google/protobuf/util/json_util.h"

namespace lumen {
namespace {

std::string Json(const google::protobuf::Message& message) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(message, &text, options);
  return text;
}

std::string Time(int64_t unix_ms) {
  if (unix_ms == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S", absl::FromUnixMillis(unix_ms),
                          absl::LocalTimeZone());
}

int Fail(std::ostream& err, const absl::Status& status) {
  err << "lumenctl: " << status.message() << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

int ExitCodeOf(const Job& job) { return job.state() == SUCCEEDED ? 0 : 1; }

std::string Duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "--:--";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? absl::StrFormat("%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
                   : absl::StrFormat("%d:%02d", s / 60, s % 60);
}

// A one-line progress bar: "[#####.....] 120/600  loss 2.3100  12345 tok/s  ETA 0:45".
std::string ProgressBar(const Job& job, const StepRecord& s, double seconds_per_step) {
  constexpr int kWidth = 30;
  const int64_t total = std::max<int64_t>(1, job.spec().train().steps());
  const int filled = static_cast<int>(kWidth * std::min<int64_t>(s.step(), total) / total);
  return absl::StrFormat("%s [%s%s] %d/%d  loss %.4f  %.0f tok/s  ETA %s", job.id(),
                         std::string(filled, '#'), std::string(kWidth - filled, '.'), s.step(),
                         total, s.loss(), s.tokens_per_s(),
                         Duration(seconds_per_step * (total - s.step())));
}

bool IsEnded(JobState state) { return state == SUCCEEDED || state == FAILED || state == CANCELLED; }

// Shows a job's progress until it ends. On a terminal: a progress bar redrawn in place; else
// (or with `json`) one line per step. Returns 0 only if the job succeeded.
int Follow(LumenClient& client, const std::string& job_id, bool json, std::ostream& out,
           std::ostream& err) {
  const bool tty = !json && &out == &std::cout && isatty(STDOUT_FILENO);
  Job last;
  JobState shown_state = JOB_STATE_UNSPECIFIED;
  bool bar_drawn = false;
  double seconds_per_step = -1;  // exponential average of the step time
  absl::Time last_print = absl::InfinitePast();
  absl::Status status = client.Watch(job_id, /*follow=*/true, [&](const WatchJobEvent& event) {
    last = event.job();
    if (!json && last.state() != shown_state && !IsEnded(last.state())) {
      shown_state = last.state();
      if (bar_drawn) out << "\n";
      bar_drawn = false;
      out << last.id() << " " << JobState_Name(last.state())
          << (last.worker().empty() ? "" : absl::StrCat(" on ", last.worker())) << std::endl;
    }
    for (const StepRecord& step : event.steps()) {
      seconds_per_step = seconds_per_step < 0
                             ? step.step_time_s()
                             : 0.9 * seconds_per_step + 0.1 * step.step_time_s();
      if (json) {
        out << Json(step) << "\n";
        continue;
      }
      const bool final_step = step.step() >= last.spec().train().steps();
      const bool history = event.steps_size() > 1 && &step != &event.steps(event.steps_size() - 1);
      if (history) continue;  // The first event carries the whole history; show its end only.
      if (tty) {
        out << "\r" << ProgressBar(last, step, seconds_per_step) << std::flush;
        bar_drawn = true;
      } else if (final_step || absl::Now() - last_print >= absl::Seconds(1)) {
        out << StepLine(last, step) << std::endl;
        last_print = absl::Now();
      }
    }
  });
  if (bar_drawn) out << "\n";
  if (!status.ok()) return Fail(err, status);
  if (json) {
    out << Json(last) << std::endl;
    return ExitCodeOf(last);
  }
  out << last.id() << " " << JobState_Name(last.state());
  if (!last.failure_reason().empty()) out << ": " << last.failure_reason();
  out << std::endl;
  if (!last.final_checkpoint().empty()) out << "checkpoint: " << last.final_checkpoint() << "\n";
  return ExitCodeOf(last);
}

void PrintJobTable(const std::vector<Job>& jobs, std::ostream& out) {
  out << absl::StrFormat("%-12s %-20s %-10s %-9s %-12s %-10s %-20s %s\n", "ID", "NAME", "STATE",
                         "WORKER", "STEP", "LOSS", "SUBMITTED", "REASON");
  for (const Job& job : jobs) {
    std::string reason = job.failure_reason();
    if (job.state() == QUEUED) {
      std::vector<std::string> parts;
      if (job.resumes() > 0) parts.push_back(absl::StrCat("to resume: ", job.resume_reason()));
      if (!job.wait_reason().empty()) parts.push_back(absl::StrCat("waits: ", job.wait_reason()));
      reason = absl::StrJoin(parts, "; ");
    }
    out << absl::StrFormat(
        "%-12s %-20s %-10s %-9s %-12s %-10s %-20s %s\n", job.id(), job.spec().name(),
        JobState_Name(job.state()),
        job.state() == RUNNING && !job.worker().empty() ? job.worker() : "-",
        absl::StrCat(job.latest_step().step(), "/", job.spec().train().steps()),
        job.has_latest_step() ? absl::StrFormat("%.4f", job.latest_step().loss()) : "-",
        Time(job.submit_time_unix_ms()), reason);
  }
}

void PrintJob(const Job& job, std::ostream& out) {
  out << "id:          " << job.id() << "\n"
      << "name:        " << job.spec().name() << "\n"
      << "state:       " << JobState_Name(job.state()) << "\n"
      << "parameters:  " << job.parameter_count() << "\n"
      << "submitted:   " << Time(job.submit_time_unix_ms()) << "\n"
      << "started:     " << Time(job.start_time_unix_ms()) << "\n"
      << "ended:       " << Time(job.end_time_unix_ms()) << "\n"
      << "worker:      " << (job.worker().empty() ? "-" : job.worker()) << "\n";
  if (job.has_latest_step()) out << "last step:   " << StepLine(job, job.latest_step()) << "\n";
  if (!job.failure_reason().empty()) out << "reason:      " << job.failure_reason() << "\n";
  if (job.state() == QUEUED && !job.wait_reason().empty()) {
    out << "waits:       " << job.wait_reason() << "\n";
  }
  if (job.has_claims()) {
    const ResourceClaims& c = job.claims();
    out << "holds:       memstore host " << FormatBytes(c.memstore_host_bytes()) << ", NVMe "
        << FormatBytes(c.memstore_nvme_bytes()) << ", worker host memory "
        << FormatBytes(c.worker_host_bytes()) << "\n";
  }
  if (!job.final_checkpoint().empty()) out << "checkpoint:  " << job.final_checkpoint() << "\n";
  if (job.resumes() > 0) {
    out << "resumed:     " << job.resumes() << (job.resumes() == 1 ? " time" : " times")
        << ", last after: " << job.resume_reason() << "; "
        << (job.state() == QUEUED ? "continues from " : "continued from ")
        << (job.state() == QUEUED ? (job.final_checkpoint().empty() ? std::string("the start")
                                                                    : job.final_checkpoint())
                                  : (job.resumed_from().empty() ? std::string("the start")
                                                                : job.resumed_from()))
        << "\n";
  }
}

void PrintCluster(const GetClusterInfoReply& info, std::ostream& out) {
  out << "data dir: " << info.data_dir() << "\n\nPROCESSES\n";
  out << absl::StrFormat("%-12s %-8s %-4s %-9s %-22s %s\n", "NAME", "PID", "UP", "RESTARTS",
                         "METRICS", "LOG");
  for (const ProcessInfo& p : info.processes()) {
    out << absl::StrFormat("%-12s %-8d %-4s %-9d %-22s %s\n", p.name(), p.pid(),
                           p.up() ? "yes" : "no", p.restarts(), p.metrics_address(), p.log_file());
  }
  out << "\nWORKERS\n";
  for (const WorkerInfo& w : info.workers()) out << WorkerLine(w) << "\n";
  out << "\nTIERS\n";
  for (const TierInfo& t : info.tiers()) {
    out << absl::StrFormat("%-30s used %s of %s\n", t.name(), FormatBytes(t.used_bytes()),
                           FormatBytes(t.capacity_bytes()));
  }
  if (!info.memstore_error().empty()) {
    out << "memstore unreachable: " << info.memstore_error() << "\n";
  } else {
    out << absl::StrFormat("memstore: %d tensors, %d checksum failures\n",
                           info.memstore_tensors(), info.memstore_checksum_failures());
    for (const auto& [key, value] : info.memstore_profile()) {
      if (key == "measured_unix_s") continue;
      out << absl::StrFormat("  measured %-26s %.3g\n", key, value);
    }
  }
  if (info.lost_tensors_size() > 0) {
    out << absl::StrFormat("LOST: %d tensors were in host memory when the memstore restarted:",
                           info.lost_tensors_size());
    for (int i = 0; i < std::min(info.lost_tensors_size(), 10); ++i) {
      out << " " << info.lost_tensors(i);
    }
    out << (info.lost_tensors_size() > 10 ? " ...\n" : "\n");
  }
  out << "\nJOBS\n";
  for (const auto& [state, count] : info.jobs_by_state()) {
    out << absl::StrFormat("%-10s %d\n", state, count);
  }
}

}  // namespace

std::string StepLine(const Job& job, const StepRecord& s) {
  std::string line =
      absl::StrFormat("%s step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tokens/s  %.3fs",
                      job.id(), s.step(), job.spec().train().steps(), s.loss(), s.lr(),
                      s.grad_norm(), s.tokens_per_s(), s.step_time_s());
  if (s.predicted_step_time_s() > 0) {
    // The planner's steady-state step time on this node, for comparison.
    absl::StrAppendFormat(&line, " (predicted %.3fs)", s.predicted_step_time_s());
  }
  if (!s.bytes_moved().empty()) {
    // Offloaded: how well transfers hid behind compute (reads counted on the CPU device only).
    absl::StrAppendFormat(&line, "  busy %.0f%%", 100 * s.device_busy_fraction());
    if (s.stall_seconds().contains("transfer")) {
      absl::StrAppendFormat(&line, "  read ahead %.0f%% (%.0f%% in time)",
                            100 * s.read_ahead_fraction(), 100 * s.prefetch_hit_rate());
    }
  }
  return line;
}

std::string WorkerLine(const WorkerInfo& w) {
  if (!w.reachable()) return absl::StrFormat("%-12s unreachable: %s", w.name(), w.error());
  const std::string job = w.running_job().empty() ? "idle" : w.running_job();
  std::string line = absl::StrFormat(
      "%-12s %-10s %-6s budget %s", w.name(), job,
      w.device_name().empty() ? w.device() : absl::StrCat(w.device(), " ", w.device_name()),
      FormatBytes(w.device_memory_budget_bytes()));
  const auto& p = w.profile();
  auto figure = [&p](const char* key) { return p.count(key) ? p.at(key) : 0.0; };
  if (p.count("bf16_gemm_flops")) {
    absl::StrAppendFormat(&line, "  measured: %.1f TFLOP/s bf16 GEMM, %.1f GB/s host->device",
                          figure("bf16_gemm_flops") / 1e12, figure("h2d_bytes_per_s") / 1e9);
  } else if (p.count("fp32_gemm_flops")) {
    absl::StrAppendFormat(&line, "  measured: %.1f GFLOP/s fp32 GEMM, %.1f GB/s copies",
                          figure("fp32_gemm_flops") / 1e9, figure("copy_bytes_per_s") / 1e9);
  }
  return line;
}

int RunLumenctl(int argc, char** argv, std::ostream& out, std::ostream& err) {
  CLI::App app{"lumenctl: submit and watch Lumen training jobs"};
  app.require_subcommand(1);
  std::string socket, data_dir, address;
  app.add_option("--socket", socket, "lumend's Unix socket (default: found from --data-dir)");
  app.add_option("--data-dir", data_dir,
                 "The node's data directory (default: $LUMEN_HOME or ~/.local/share/lumen)");
  app.add_option("--address", address,
                 "The node: a Unix socket path or a loopback host:port (default: $LUMEN_ADDRESS, "
                 "else the socket found from --data-dir)")
      ->envname("LUMEN_ADDRESS");
  bool json = false;

  std::string spec_file;
  bool watch = false;
  auto* submit = app.add_subcommand("submit", "Submit a job spec (YAML)");
  submit->add_option("spec", spec_file, "Job spec file")->required();
  submit->add_flag("--wait,--watch,-w", watch,
                   "Show progress until the job ends; exit 0 only if it succeeded");
  submit->add_flag("--json", json, "Print the job as JSON");

  auto* jobs = app.add_subcommand("jobs", "List jobs");
  jobs->add_flag("--json", json, "One JSON object per line");

  std::string job_id;
  auto* status = app.add_subcommand("status", "Show one job");
  status->add_option("job", job_id, "Job id")->required();
  status->add_flag("--json", json, "Print the job as JSON");

  auto* watch_cmd = app.add_subcommand(
      "watch", "Show a job's progress until it ends; exit 0 only if it succeeded");
  watch_cmd->add_option("job", job_id, "Job id")->required();
  watch_cmd->add_flag("--json", json, "One JSON step record per line, then the job");

  auto* logs = app.add_subcommand("logs", "Print a job's per-step records");
  logs->add_option("job", job_id, "Job id")->required();
  logs->add_flag("--json", json, "One JSON object per line");
  bool follow = false;
  logs->add_flag("--follow,-f", follow, "Keep printing new steps until the job ends");

  auto* cancel = app.add_subcommand("cancel", "Cancel a job");
  cancel->add_option("job", job_id, "Job id")->required();

  auto* cluster = app.add_subcommand("cluster", "Show the node's processes, workers and tiers");
  cluster->add_flag("--json", json, "Print as JSON");

  DataPrepareOptions prepare_options;
  auto* data = app.add_subcommand("data", "Prepare training data");
  data->require_subcommand(1);
  auto* prepare = data->add_subcommand("prepare", "Tokenize a text file into a token file");
  prepare->add_option("--input", prepare_options.input, "Text file")->required();
  prepare->add_option("--out", prepare_options.output, "Token file to write (.bin)")->required();
  prepare->add_option("--tokenizer", prepare_options.tokenizer,
                      "byte (default), or spm:MODEL to encode with a SentencePiece .model file");
  prepare->add_option("--train-spm", prepare_options.train_spm_vocab,
                      "Train a SentencePiece model with this vocabulary on the input, write it "
                      "to OUT.spm.model and encode with it");
  prepare->add_option("--spm-type", prepare_options.spm_type,
                      "SentencePiece model type for --train-spm: unigram or bpe")
      ->default_val("unigram");

  ExportOptions export_options;
  auto* export_cmd = app.add_subcommand(
      "export", "Copy a job's checkpoint directory (on the node's machine) to --out");
  export_cmd->add_option("job", job_id, "Job id")->required();
  export_cmd->add_option("--step", export_options.step,
                         "Checkpoint step (default: the latest complete checkpoint)");
  export_cmd->add_option("--out", export_options.out,
                         "Destination directory; must not exist or be empty")
      ->required();

  PlanCommandOptions plan_options;
  auto* plan = app.add_subcommand(
      "plan", "Predict where a job's tensors live and how fast it trains on a hardware profile "
              "(no node needed, except for --hardware node); exit 0 if it fits, 3 if not");
  plan->add_option("spec", plan_options.job_file, "Job spec file")->required();
  plan->add_option("--hardware", plan_options.hardware,
                   "Profile file, built-in name (1x-rtx4090, 1x-h100, 8x-rtx4090), or 'node': "
                   "the running node as it measured itself")
      ->default_val("1x-rtx4090");
  plan->add_option("--workers", plan_options.workers, "Workers to plan for (default: the job's)");
  plan->add_option("--device-memory", plan_options.device_memory,
                   "Per-worker device budget, e.g. 8GiB (default: the profile's)");
  plan->add_flag("--json", plan_options.json, "One JSON object");

  GenerateOptions generate_options;
  auto* generate = app.add_subcommand("generate", "Sample text from a checkpoint directory");
  generate->add_option("--checkpoint", generate_options.checkpoint, "Exported directory")
      ->required();
  generate->add_option("--prompt", generate_options.prompt, "Prompt text")->required();
  generate->add_option("--max-tokens", generate_options.max_tokens, "Tokens to generate")
      ->default_val(200);
  generate->add_option("--temperature", generate_options.temperature, "0 = greedy")
      ->default_val(0.8);
  generate->add_option("--top-k", generate_options.top_k, "0 = no limit")->default_val(40);
  generate->add_option("--seed", generate_options.seed, "Sampling seed")->default_val(1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e, out, err);
  }

  std::string target = !socket.empty() ? socket : address;
  if (target.empty()) target = DefaultSocketPath(data_dir.empty() ? DefaultDataDir() : data_dir);

  // Commands that need no node.
  if (plan->parsed()) {
    GetClusterInfoReply node;
    if (plan_options.hardware == kNodeHardware) {
      auto client = LumenClient::Connect(target);
      if (!client.ok()) return Fail(err, client.status());
      auto info = (*client)->ClusterInfo();
      if (!info.ok()) return Fail(err, info.status());
      node = *std::move(info);
      plan_options.node = &node;
    }
    return RunPlanCommand(plan_options, out, err);
  }
  if (prepare->parsed()) {
    prepare_options.progress = &out;
    auto result = PrepareData(prepare_options);
    if (!result.ok()) return Fail(err, result.status());
    if (!result->spm_model.empty()) out << "tokenizer: " << result->spm_model << "\n";
    out << "wrote " << result->tokens << " tokens (" << result->dtype << ", vocab "
        << result->vocab_size << ") to " << prepare_options.output << "\n"
        << "in the job spec: data: {path: " << prepare_options.output
        << ", token_dtype: " << result->dtype << "}; model.vocab_size >= "
        << result->vocab_size << "\n";
    return 0;
  }
  if (generate->parsed()) {
    auto text = Generate(generate_options);
    if (!text.ok()) return Fail(err, text.status());
    out << *text << std::endl;
    return 0;
  }

  auto client_or = LumenClient::Connect(target);
  if (!client_or.ok()) return Fail(err, client_or.status());
  LumenClient& client = **client_or;

  if (submit->parsed()) {
    std::ifstream in(spec_file);
    if (!in) return Fail(err, absl::NotFoundError(absl::StrCat("cannot read ", spec_file)));
    std::stringstream text;
    text << in.rdbuf();
    const std::string base_dir =
        std::filesystem::path(AbsolutePath(spec_file)).parent_path().string();
    auto job = client.Submit(text.str(), base_dir);
    if (!job.ok()) return Fail(err, job.status());
    if (json) {
      out << Json(*job) << "\n";
    } else {
      out << "submitted " << job->id() << " (" << job->spec().name() << ", "
          << job->parameter_count() << " parameters)\n";
    }
    return watch ? Follow(client, job->id(), json, out, err) : 0;
  }
  if (jobs->parsed()) {
    auto list = client.List();
    if (!list.ok()) return Fail(err, list.status());
    if (json) {
      for (const Job& job : *list) out << Json(job) << "\n";
    } else {
      PrintJobTable(*list, out);
    }
    return 0;
  }
  if (status->parsed()) {
    auto job = client.Get(job_id);
    if (!job.ok()) return Fail(err, job.status());
    if (json) {
      out << Json(*job) << "\n";
    } else {
      PrintJob(*job, out);
    }
    return 0;
  }
  if (watch_cmd->parsed()) return Follow(client, job_id, json, out, err);
  if (logs->parsed()) {
    Job job;
    absl::Status s = client.Watch(job_id, follow, [&](const WatchJobEvent& event) {
      job = event.job();
      for (const StepRecord& step : event.steps()) {
        out << (json ? Json(step) : StepLine(job, step)) << "\n";
      }
    });
    if (!s.ok()) return Fail(err, s);
    return follow ? ExitCodeOf(job) : 0;
  }
  if (export_cmd->parsed()) {
    auto job = client.Get(job_id);
    if (!job.ok()) return Fail(err, job.status());
    if (job->output_dir().empty()) {
      return Fail(err, absl::FailedPreconditionError(absl::StrCat(
                           job_id, " has no output directory yet (", JobState_Name(job->state()),
                           ")")));
    }
    export_options.output_dir = job->output_dir();
    auto source = ExportCheckpoint(export_options);
    if (!source.ok()) {
      return Fail(err, absl::Status(source.status().code(),
                                    absl::StrCat(job_id, ": ", source.status().message())));
    }
    out << "exported " << *source << " to " << export_options.out << "\n";
    return 0;
  }
  if (cancel->parsed()) {
    auto job = client.Cancel(job_id);
    if (!job.ok()) return Fail(err, job.status());
    out << job->id() << " " << JobState_Name(job->state()) << "\n";
    return 0;
  }
  if (cluster->parsed()) {
    auto info = client.ClusterInfo();
    if (!info.ok()) return Fail(err, info.status());
    if (json) {
      out << Json(*info) << "\n";
    } else {
      PrintCluster(*info, out);
    }
    return 0;
  }
  return 1;
}

}  // namespace lumen
