#include "common/node_options.h"

#include <cmath>

#include <exception>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <yaml-cpp/yaml.h>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/paths.h"
#include "common/grpc_util.h"
#include "common/status_macros.h"
#include "common/units.h"

namespace lumen {
namespace {

constexpr int kMaxWorkers = 256;
constexpr size_t kMaxUnixSocketPath = 107;  // sizeof(sockaddr_un::sun_path) - 1

// Flag names without dashes, in help order. "config" is handled separately.
const std::vector<std::string>& ScalarFlags() {
  static const auto* flags = new std::vector<std::string>{
      "data-dir",    "socket",          "listen",  "workers", "device", "device-memory",
      "host-memory", "metrics-address", "bin-dir", "optimizer-state-tier", "optimizer-overlap",
      "link-gbps"};
  return *flags;
}
constexpr const char kNvmeDirFlag[] = "nvme-dir";

absl::Status Invalid(absl::string_view flag, absl::string_view value, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, " \"", value, "\": ", why));
}

// Values per flag name; a flag absent from the map was given neither on the command line nor
// in the config file.
using RawValues = std::map<std::string, std::vector<std::string>>;

absl::Status MergeConfigFile(const std::string& file, RawValues* values) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::BadFile&) {
    return absl::InvalidArgumentError(
        absl::StrCat("--config: cannot read node config file ", file));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--config: node config file ", file, " is not valid YAML: ", e.what()));
  }
  if (root.IsNull()) return absl::OkStatus();
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "node config file ", file, " must be a YAML map of flag names to values"));
  }
  RawValues from_file;
  for (const auto& entry : root) {
    std::string key;
    try {
      key = entry.first.as<std::string>();
    } catch (const YAML::Exception&) {
      return absl::InvalidArgumentError(
          absl::StrCat("node config file ", file, " has a key that is not a string"));
    }
    std::string name = absl::StrReplaceAll(key, {{"_", "-"}});
    bool known = name == kNvmeDirFlag;
    for (const std::string& flag : ScalarFlags()) known |= name == flag;
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown key \"", key, "\" in node config file ", file, " (known keys: ",
          absl::StrJoin(ScalarFlags(), ", "), ", ", kNvmeDirFlag, ")"));
    }
    if (from_file.count(name) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("key \"", key, "\" appears twice in node config file ", file));
    }
    const YAML::Node& value = entry.second;
    std::vector<std::string>& out = from_file[name];
    if (value.IsNull()) {
      from_file.erase(name);
    } else if (value.IsScalar()) {
      out.push_back(value.Scalar());
    } else if (value.IsSequence() && name == kNvmeDirFlag) {
      for (const auto& item : value) {
        if (!item.IsScalar()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "key \"", key, "\" in node config file ", file, " must be a list of strings"));
        }
        out.push_back(item.Scalar());
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "key \"", key, "\" in node config file ", file, " must be a single value",
          name == kNvmeDirFlag ? " or a list" : ""));
    }
  }
  // The command line wins, flag by flag.
  for (auto& [name, vals] : from_file) values->emplace(name, std::move(vals));
  return absl::OkStatus();
}

absl::Status CheckLoopback(absl::string_view flag, absl::string_view address) {
  std::string host;
  int port = 0;
  RETURN_IF_ERROR(SplitHostPort(flag, address, &host, &port));
  // The one loopback rule of the project (also applied by the servers themselves).
  absl::StatusOr<std::string> checked = LoopbackListenAddress(std::string(address));
  if (!checked.ok()) return Invalid(flag, address, checked.status().message());
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParsePositiveBytes(absl::string_view flag, const std::string& value) {
  absl::StatusOr<int64_t> bytes = ParseBytes(value);
  if (!bytes.ok()) return Invalid(flag, value, bytes.status().message());
  if (*bytes <= 0) return Invalid(flag, value, "must be greater than zero");
  return *bytes;
}

absl::StatusOr<NodeOptions> Convert(const RawValues& values) {
  NodeOptions o;
  auto get = [&values](const std::string& name) -> const std::string* {
    auto it = values.find(name);
    return it == values.end() || it->second.empty() ? nullptr : &it->second.back();
  };

  if (const std::string* v = get("data-dir")) {
    if (v->empty()) return Invalid("data-dir", *v, "must not be empty");
    o.data_dir = AbsolutePath(*v);
  } else {
    o.data_dir = AbsolutePath(DefaultDataDir());
  }

  if (const std::string* v = get("socket")) {
    if (v->empty()) return Invalid("socket", *v, "must not be empty");
    o.socket = AbsolutePath(*v);
  } else {
    o.socket = AbsolutePath(DefaultSocketPath(o.data_dir));
  }
  if (o.socket.size() > kMaxUnixSocketPath) {
    return Invalid("socket", o.socket,
                   absl::StrCat("is ", o.socket.size(), " bytes; a Unix socket path must be at "
                                "most ", kMaxUnixSocketPath, " bytes"));
  }

  if (const std::string* v = get("listen")) {
    if (!v->empty()) RETURN_IF_ERROR(CheckLoopback("listen", *v));
    o.listen = *v;
  }

  if (const std::string* v = get("workers")) {
    if (!absl::SimpleAtoi(*v, &o.workers) || o.workers < 1 || o.workers > kMaxWorkers) {
      return Invalid("workers", *v,
                     absl::StrCat("must be an integer from 1 to ", kMaxWorkers));
    }
  }

  if (const std::string* v = get("device")) {
    if (*v == "cpu") {
      o.device = DeviceKind::kCpu;
    } else if (*v == "cuda") {
      o.device = DeviceKind::kCuda;
    } else {
      return Invalid("device", *v, "must be cpu or cuda");
    }
  }

  if (const std::string* v = get("device-memory")) {
    ASSIGN_OR_RETURN(o.device_memory_bytes, ParsePositiveBytes("device-memory", *v));
  } else if (o.device == DeviceKind::kCuda) {
    o.device_memory_bytes = 0;  // each worker's GPU: its free memory less 1 GiB
  }
  if (const std::string* v = get("host-memory")) {
    ASSIGN_OR_RETURN(o.host_memory_bytes, ParsePositiveBytes("host-memory", *v));
  }

  if (auto it = values.find(kNvmeDirFlag); it != values.end()) {
    for (const std::string& v : it->second) {
      ASSIGN_OR_RETURN(NvmeDir dir, ParseNvmeDir(v));
      o.nvme_dirs.push_back(std::move(dir));
    }
  }

  if (const std::string* v = get("metrics-address")) {
    std::string host;
    int port = 0;
    RETURN_IF_ERROR(SplitHostPort("metrics-address", *v, &host, &port));
    o.metrics_address = *v;
  }

  if (const std::string* v = get("bin-dir")) {
    if (!v->empty()) o.bin_dir = AbsolutePath(*v);
  }

  if (const std::string* v = get("optimizer-state-tier")) {
    if (*v != "host" && *v != "nvme") {
      return Invalid("optimizer-state-tier", *v, "must be host or nvme");
    }
    if (*v == "nvme" && o.nvme_dirs.empty()) {
      return Invalid("optimizer-state-tier", *v, "needs at least one --nvme-dir");
    }
    o.optimizer_state_tier = *v;
  }

  if (const std::string* v = get("optimizer-overlap")) {
    if (*v != "forward" && *v != "backward") {
      return Invalid("optimizer-overlap", *v, "must be forward or backward");
    }
    o.optimizer_overlap = *v;
  }

  if (const std::string* v = get("link-gbps")) {
    double gbps = 0;
    if (!absl::SimpleAtod(*v, &gbps) || !(gbps >= 0) || !std::isfinite(gbps)) {
      return Invalid("link-gbps", *v, "must be a number of GB/s >= 0 (0 = off)");
    }
    o.link_gbps = gbps;
  }
  return o;
}

}  // namespace

absl::StatusOr<NvmeDir> ParseNvmeDir(const std::string& value) {
  NvmeDir dir;
  size_t colon = value.rfind(':');
  std::string path = value.substr(0, colon);
  if (colon != std::string::npos) {
    absl::StatusOr<int64_t> cap = ParseBytes(value.substr(colon + 1));
    if (!cap.ok()) {
      return Invalid(kNvmeDirFlag, value,
                     absl::StrCat("capacity after ':' is not a byte count: ",
                                  cap.status().message()));
    }
    dir.capacity_bytes = *cap;
  }
  if (path.empty()) return Invalid(kNvmeDirFlag, value, "the directory is empty");
  dir.path = AbsolutePath(path);
  return dir;
}


absl::string_view DeviceKindName(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCpu:
      return "cpu";
    case DeviceKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

std::string NvmeDir::ToFlag() const {
  if (capacity_bytes == 0) return path;
  return absl::StrCat(path, ":", capacity_bytes);
}

absl::Status SplitHostPort(absl::string_view flag, absl::string_view address, std::string* host,
                           int* port) {
  absl::string_view h;
  absl::string_view p;
  if (!address.empty() && address[0] == '[') {
    size_t close = address.find(']');
    if (close == absl::string_view::npos || close + 1 >= address.size() ||
        address[close + 1] != ':') {
      return Invalid(flag, address, "expected [host]:port");
    }
    h = address.substr(1, close - 1);
    p = address.substr(close + 2);
  } else {
    size_t colon = address.rfind(':');
    if (colon == absl::string_view::npos) return Invalid(flag, address, "expected host:port");
    h = address.substr(0, colon);
    p = address.substr(colon + 1);
  }
  int parsed = -1;
  if (h.empty()) return Invalid(flag, address, "the host is empty");
  if (!absl::SimpleAtoi(p, &parsed) || parsed < 0 || parsed > 65535) {
    return Invalid(flag, address, "the port must be an integer from 0 to 65535");
  }
  *host = std::string(h);
  *port = parsed;
  return absl::OkStatus();
}

absl::StatusOr<NodeOptions> ParseNodeOptions(int argc, const char* const* argv) {
  CLI::App app("lumend: starts and supervises the processes of one Lumen node", "lumend");
  std::map<std::string, std::string> bound;  // CLI11 needs somewhere to store values
  std::map<std::string, CLI::Option*> options;
  std::vector<std::string> nvme_dirs;
  std::string config_file;

  const std::map<std::string, std::string> help = {
      {"data-dir", "Node directory (default: $LUMEN_HOME or ~/.local/share/lumen)"},
      {"socket", "Client Unix socket (default: $LUMEN_SOCKET or DATA_DIR/lumend.sock)"},
      {"listen", "Also serve clients on TCP host:port (loopback only until TLS exists)"},
      {"workers", "Worker processes: one per GPU, or N CPU devices (default 1)"},
      {"device", "Worker device: cpu or cuda (default cpu)"},
      {"device-memory",
       "Memory budget per worker, e.g. 64MiB (default 1GiB on the CPU device; with --device "
       "cuda, the GPU's free memory less 1GiB, and a smaller value emulates a smaller card)"},
      {"host-memory", "Memstore host-RAM arena, e.g. 8GiB (default 1GiB)"},
      {"metrics-address",
       "lumend's Prometheus endpoint host:port; port 0 picks one (default 127.0.0.1:0)"},
      {"bin-dir",
       "Directory with the memstore, worker and coordinator binaries (default: found next "
       "to lumend)"},
      {"link-gbps",
       "Link model: host<->device GB/s per direction for offloaded tensors (default 0 = off)"},
      {"optimizer-state-tier",
       "Memstore tier of the Adam state of jobs larger than --device-memory: host or nvme "
       "(default host; on a GPU worker host keeps a streamed job's moments in the worker)"},
      {"optimizer-overlap",
       "When jobs larger than --device-memory run AdamW on the host: forward (once the "
       "gradient norm is known, during the next step's forward) or backward (as each gradient "
       "completes; needs a second copy of parameters and moments, in the memstore on the CPU "
       "device and in the worker on a GPU) (default forward)"},
  };
  for (const std::string& name : ScalarFlags()) {
    options[name] = app.add_option("--" + name, bound[name], help.at(name));
  }
  options[kNvmeDirFlag] =
      app.add_option("--nvme-dir", nvme_dirs,
                     "NVMe directory for memstore page files, DIR or DIR:CAPACITY (repeatable; "
                     "capacity default unlimited)")
          ->allow_extra_args(false);
  app.add_option("--config", config_file,
                 "YAML node config file with the same names as the flags (flags override it)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    NodeOptions shown;
    shown.help_shown = true;
    return shown;
  } catch (const CLI::ParseError& e) {
    return absl::InvalidArgumentError(absl::StrCat("lumend: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("lumend: ", e.what()));
  }

  RawValues values;
  for (const auto& [name, option] : options) {
    if (option->count() > 0) values[name] = option->results();
  }
  if (!config_file.empty()) {
    config_file = AbsolutePath(config_file);
    RETURN_IF_ERROR(MergeConfigFile(config_file, &values));
  }
  ASSIGN_OR_RETURN(NodeOptions result, Convert(values));
  result.config_file = config_file;
  return result;
}

}  // namespace lumen
