// Where a Lumen node lives on disk: the one rule shared by lumend and lumenctl.
// Functions read the environment on each call; thread-safe as long as nobody calls setenv
// concurrently.
#ifndef LUMEN_COMMON_PATHS_H_
#define LUMEN_COMMON_PATHS_H_

#include <string>

namespace lumen {

// Sockets whose path is at least this long go to the runtime directory instead of the data
// directory (sockaddr_un::sun_path holds 108 bytes on Linux; we keep a margin).
inline constexpr size_t kMaxSocketPathInDataDir = 100;

// The node's data directory: $LUMEN_HOME if set and non-empty, else
// $HOME/.local/share/lumen (the home directory comes from the password database when $HOME is
// unset).
std::string DefaultDataDir();

// The client socket of the node whose data directory is `data_dir`: $LUMEN_SOCKET if set and
// non-empty; else <data_dir>/lumend.sock when that path is shorter than
// kMaxSocketPathInDataDir bytes; else $XDG_RUNTIME_DIR/lumen-<16 hex digits>.sock (/tmp when
// XDG_RUNTIME_DIR is unset), where the digits are a stable 64-bit hash of the absolute
// data directory, so lumend and lumenctl agree on it.
std::string DefaultSocketPath(const std::string& data_dir);

// `path` made absolute against the current directory and lexically normalised ("a/./b/../c"
// -> "<cwd>/a/c"). Symlinks are not resolved and the path need not exist.
std::string AbsolutePath(const std::string& path);

}  // namespace lumen

#endif  // LUMEN_COMMON_PATHS_H_
