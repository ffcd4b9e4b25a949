// lumend: starts and supervises the processes of one Lumen node (memstore, workers,
// coordinator). See lumend/node.h and lumend/supervisor.h.
#include <limits.h>
#include <unistd.h>

#include <iostream>
#include <memory>
#include <string>

#include "common/node_options.h"
#include "glog/logging.h"
#include "lumend/node.h"

namespace {

std::string SelfExe(const char* argv0) {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return argv0;
  return std::string(buf, n);
}

int Fail(const absl::Status& status) {
  std::cerr << "lumend: " << status.message() << std::endl;
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::StatusOr<lumen::NodeOptions> options = lumen::ParseNodeOptions(argc, argv);
  if (!options.ok()) return Fail(options.status());
  if (options->help_shown) return 0;

  absl::Status prepared = lumen::PrepareDataDir(options->data_dir);
  if (!prepared.ok()) return Fail(prepared);
  absl::StatusOr<std::unique_ptr<lumen::DataDirLock>> lock =
      lumen::DataDirLock::Acquire(options->data_dir);
  if (!lock.ok()) return Fail(lock.status());

  lumen::InitLumendLogging(argv[0], options->data_dir + "/logs/lumend.log");

  absl::StatusOr<std::unique_ptr<lumen::Node>> node =
      lumen::Node::Create(*options, std::move(*lock), SelfExe(argv[0]));
  if (!node.ok()) {
    LOG(ERROR) << node.status();
    return 1;
  }
  lumen::StopOnSignals(node->get());

  absl::Status status = (*node)->Start();
  if (status.ok()) {
    std::cout << (*node)->ServingLine() << std::endl;
    status = (*node)->Run();
  }
  if (!status.ok()) {
    LOG(ERROR) << status;
    return 1;
  }
  return 0;
}
