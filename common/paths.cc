#include "common/paths.h"

#include <pwd.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace lumen {
namespace {

std::string GetEnv(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

std::string HomeDir() {
  std::string home = GetEnv("HOME");
  if (!home.empty()) return home;
  std::vector<char> buf(16384);
  struct passwd pw;
  struct passwd* result = nullptr;
  if (getpwuid_r(getuid(), &pw, buf.data(), buf.size(), &result) == 0 && result != nullptr &&
      result->pw_dir != nullptr) {
    return result->pw_dir;
  }
  return "/";
}

// FNV-1a, 64 bit: stable across builds and machines, unlike std::hash.
uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

std::string AbsolutePath(const std::string& path) {
  std::string full = path;
  if (full.empty() || full[0] != '/') {
    char cwd[4096];
    std::string base = getcwd(cwd, sizeof(cwd)) != nullptr ? cwd : "/";
    full = absl::StrCat(base, "/", path);
  }
  std::vector<std::string> parts;
  for (absl::string_view part : absl::StrSplit(full, '/', absl::SkipEmpty())) {
    if (part == ".") continue;
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();
      continue;
    }
    parts.emplace_back(part);
  }
  return absl::StrCat("/", absl::StrJoin(parts, "/"));
}

std::string DefaultDataDir() {
  std::string lumen_home = GetEnv("LUMEN_HOME");
  if (!lumen_home.empty()) return lumen_home;
  return absl::StrCat(HomeDir(), "/.local/share/lumen");
}

std::string DefaultSocketPath(const std::string& data_dir) {
  std::string from_env = GetEnv("LUMEN_SOCKET");
  if (!from_env.empty()) return from_env;
  std::string in_data_dir = absl::StrCat(data_dir, "/lumend.sock");
  if (in_data_dir.size() < kMaxSocketPathInDataDir) return in_data_dir;
  std::string runtime_dir = GetEnv("XDG_RUNTIME_DIR");
  if (runtime_dir.empty()) runtime_dir = "/tmp";
  return absl::StrFormat("%s/lumen-%016x.sock", runtime_dir, Fnv1a64(AbsolutePath(data_dir)));
}

}  // namespace lumen
