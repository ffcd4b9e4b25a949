#include "client/export.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lumen {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<fs::path> PickCheckpoint(const ExportOptions& options) {
  const std::vector<int64_t> steps = ListCheckpointSteps(options.output_dir);
  if (steps.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("no complete checkpoint in ", options.output_dir, " yet"));
  }
  const int64_t step = options.step < 0 ? steps.back() : options.step;
  if (!std::binary_search(steps.begin(), steps.end(), step)) {
    return absl::NotFoundError(absl::StrCat("--step ", step, ": no checkpoint step-", step,
                                            " in ", options.output_dir,
                                            "; available steps: ", absl::StrJoin(steps, ", ")));
  }
  return fs::path(options.output_dir) / absl::StrCat("step-", step);
}

absl::Status CheckDestination(const fs::path& out) {
  std::error_code ec;
  if (!fs::exists(out, ec)) return absl::OkStatus();
  if (!fs::is_directory(out, ec) || !fs::is_empty(out, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat("--out ", out.string(), " exists and is not an empty directory"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<int64_t> ListCheckpointSteps(const std::string& output_dir) {
  std::vector<int64_t> steps;
  std::error_code ec;
  for (fs::directory_iterator it(output_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    int64_t step = 0;
    if (name.rfind("step-", 0) == 0 && absl::SimpleAtoi(name.substr(5), &step) && step >= 0 &&
        it->is_directory(ec)) {
      steps.push_back(step);
    }
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

absl::StatusOr<std::string> ExportCheckpoint(const ExportOptions& options) {
  if (options.out.empty()) return absl::InvalidArgumentError("--out is empty");
  auto source = PickCheckpoint(options);
  if (!source.ok()) return source.status();
  const fs::path out = fs::absolute(options.out).lexically_normal();
  if (auto s = CheckDestination(out); !s.ok()) return s;
  std::error_code ec;
  fs::create_directories(out.parent_path(), ec);
  const fs::path tmp = out.parent_path() /
                       absl::StrCat(".", out.filename().string(), ".export-", getpid(), ".tmp");
  fs::remove_all(tmp, ec);
  fs::copy(*source, tmp, fs::copy_options::recursive, ec);
  if (!ec) fs::rename(tmp, out, ec);  // replaces `out` only if it is an empty directory
  if (ec) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    return absl::InternalError(absl::StrCat("copying ", source->string(), " to ", out.string(),
                                            ": ", ec.message()));
  }
  return source->string();
}

}  // namespace lumen
