// The options of one Lumen node (the flags of `lumend`) and their parser. Plain data;
// thread-compatible.
#ifndef LUMEN_COMMON_NODE_OPTIONS_H_
#define LUMEN_COMMON_NODE_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lumen {

enum class DeviceKind { kCpu, kCuda };

// "cpu" or "cuda".
absl::string_view DeviceKindName(DeviceKind kind);

// One NVMe directory for memstore page files.
struct NvmeDir {
  std::string path;            // absolute
  int64_t capacity_bytes = 0;  // 0 = unlimited (up to the free space of the file system)

  // "PATH" or "PATH:BYTES", the form memstore's --nvme-dir takes.
  std::string ToFlag() const;
};

// Parses "DIR" or "DIR:CAPACITY" (capacity as ParseBytes takes it); the path is made absolute.
absl::StatusOr<NvmeDir> ParseNvmeDir(const std::string& value);

struct NodeOptions {
  // True when --help was given: the help text has been printed on stdout and the caller
  // should exit 0 without doing anything else. The other fields are then unset.
  bool help_shown = false;

  // The node's directory (locks, logs, sockets, node.json, RocksDB state). Absolute.
  // Default: DefaultDataDir() ($LUMEN_HOME or ~/.local/share/lumen).
  std::string data_dir;

  // The client Unix socket the coordinator serves. Default: DefaultSocketPath(data_dir).
  std::string socket;

  // Optional TCP endpoint "host:port" for clients. Empty = Unix socket only. Only loopback
  // hosts are accepted until TLS exists, since the control plane is unauthenticated.
  std::string listen;

  // Worker processes: one per GPU with --device cuda, or N CPU devices. More CPU workers
  // exercise multi-device schedules but split the cores between them.
  int workers = 1;

  DeviceKind device = DeviceKind::kCpu;

  // Memory budget of each worker's device. On the CPU device this is a host buffer, so it
  // comes out of host RAM on top of host_memory. With --device cuda and no --device-memory it
  // is 0: each worker takes its GPU's free memory less 1 GiB.
  int64_t device_memory_bytes = int64_t{1} << 30;

  // The memstore's host-RAM arena. Larger keeps more state off NVMe; it is allocated up front.
  int64_t host_memory_bytes = int64_t{1} << 30;

  // NVMe directories for state that does not fit in host memory. Empty = host memory only.
  std::vector<NvmeDir> nvme_dirs;

  // lumend's own Prometheus endpoint "host:port"; port 0 picks a free port (written to
  // node.json and prometheus_targets.json).
  std::string metrics_address = "127.0.0.1:0";

  // Directory holding the memstore, worker and coordinator binaries. Empty = find them next to
  // lumend (Bazel runfiles, then the install directory).
  std::string bin_dir;

  // Where jobs larger than the device budget keep their Adam state in the memstore: "host" or
  // "nvme" (needs --nvme-dir). NVMe saves host RAM at the price of drive writes every step. On
  // a GPU worker, "host" keeps a streamed job's moments in the worker itself.
  std::string optimizer_state_tier = "host";

  // When offloaded jobs run AdamW on the host: "forward" (once the step's gradient norm is
  // known, overlapping the next step's forward) or "backward" (each tensor as soon as its
  // gradient is complete, overlapping the backward, kept when the norm needs no clipping; the
  // memstore holds a second copy of parameters and moments, or on a GPU worker the worker, for
  // jobs that clip, except the embedding's). On the CPU device the backward's
  // cores are the optimizer's, so backward measured 5-13% slower steps there; on a GPU node
  // the host CPU is otherwise idle during the backward.
  std::string optimizer_overlap = "forward";

  // The link model: host<->device GB/s per direction for offloaded tensors; 0 = off. Set it to
  // device FLOP/s / 6,600 to run the CPU device at an RTX 4090's FLOPs-per-PCIe-byte ratio.
  double link_gbps = 0;

  // The node config file given with --config, or empty.
  std::string config_file;
};

// Parses lumend's command line. `--config FILE` reads a YAML map whose keys are the flag
// names without the leading dashes ("data-dir: /srv/lumen"; "data_dir" is accepted too);
// flags given on the command line override the file. Returns InvalidArgument naming the flag,
// key or file at fault. With --help, prints the help text to stdout and returns options with
// help_shown set.
absl::StatusOr<NodeOptions> ParseNodeOptions(int argc, const char* const* argv);

// Parses "host:port" or "[v6host]:port" into its parts; InvalidArgument naming `flag`
// otherwise.
absl::Status SplitHostPort(absl::string_view flag, absl::string_view address, std::string* host,
                           int* port);

}  // namespace lumen

#endif  // LUMEN_COMMON_NODE_OPTIONS_H_
