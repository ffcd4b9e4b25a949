#include "client/spm_bridge.h"

#include <dlfcn.h>

#include <filesystem>
#include <mutex>
#include <system_error>

namespace lumen::spm_bridge {
namespace {

void* Open(const std::string& path, std::string* error) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (handle == nullptr) {
    const char* e = dlerror();
    *error += (error->empty() ? "" : "; ") + std::string(e != nullptr ? e : path);
  }
  return handle;
}

const Api* Load(std::string* error) {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::canonical("/proc/self/exe", ec);
  void* handle = nullptr;
  if (!ec) handle = Open((exe.parent_path() / kLibrary).string(), error);
  if (handle == nullptr) handle = Open(kLibrary, error);
  if (handle == nullptr) return nullptr;
  using ApiFn = const Api* (*)();
  auto fn = reinterpret_cast<ApiFn>(dlsym(handle, kApiSymbol));
  if (fn == nullptr) {
    *error = std::string(kLibrary) + " has no " + kApiSymbol;
    return nullptr;
  }
  error->clear();
  return fn();
}

}  // namespace

const Api* LoadApi(std::string* error) {
  static std::once_flag once;
  static const Api* api = nullptr;
  static std::string load_error;
  std::call_once(once, [] { api = Load(&load_error); });
  if (api == nullptr) *error = "SentencePiece support (" + std::string(kLibrary) +
                               ") cannot be loaded: " + load_error;
  return api;
}

}  // namespace lumen::spm_bridge
