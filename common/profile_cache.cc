#include "common/profile_cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"

namespace lumen {
namespace {

absl::StatusOr<ProfileFigures> ReadCache(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(path);
  std::stringstream text;
  text << in.rdbuf();
  google::protobuf::Struct object;
  if (!google::protobuf::util::JsonStringToMessage(text.str(), &object).ok()) {
    return absl::DataLossError(absl::StrCat(path, " is not a JSON object"));
  }
  ProfileFigures figures;
  for (const auto& [key, value] : object.fields()) {
    if (value.kind_case() != google::protobuf::Value::kNumberValue) {
      return absl::DataLossError(absl::StrCat(path, ": ", key, " is not a number"));
    }
    figures[key] = value.number_value();
  }
  return figures;
}

absl::Status WriteCache(const std::string& path, const ProfileFigures& figures) {
  std::string text = "{\n";
  bool first = true;
  for (const auto& [key, value] : figures) {
    absl::StrAppend(&text, first ? "" : ",\n", absl::StrFormat("  \"%s\": %.6g", key, value));
    first = false;
  }
  text += "\n}\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp));
  }
  return absl::OkStatus();
}

}  // namespace

bool HasCachedProfile(const std::string& data_dir, const std::string& name) {
  return ReadCache((std::filesystem::path(data_dir) / "profile" / (name + ".json")).string()).ok();
}

absl::StatusOr<ProfileFigures> CachedProfile(
    const std::string& data_dir, const std::string& name, bool remeasure,
    const std::function<absl::StatusOr<ProfileFigures>()>& measure) {
  const std::filesystem::path dir = std::filesystem::path(data_dir) / "profile";
  const std::string path = (dir / (name + ".json")).string();
  if (!remeasure) {
    absl::StatusOr<ProfileFigures> cached = ReadCache(path);
    if (cached.ok()) return cached;
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  const std::string lock_path = (dir / ".measuring").string();
  const int lock = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock < 0) {
    return absl::InternalError(absl::StrCat("cannot open ", lock_path, ": ", strerror(errno)));
  }
  struct CloseLock {
    int fd;
    ~CloseLock() { close(fd); }  // releases the flock
  } close_lock{lock};
  while (flock(lock, LOCK_EX) != 0) {
    if (errno != EINTR) {
      return absl::InternalError(absl::StrCat("cannot lock ", lock_path, ": ", strerror(errno)));
    }
  }
  ASSIGN_OR_RETURN(ProfileFigures figures, measure());
  figures["measured_unix_s"] = absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch());
  RETURN_IF_ERROR(WriteCache(path, figures));
  return figures;
}

}  // namespace lumen
