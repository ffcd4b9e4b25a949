// Helpers shared by the engine's tests. Test-only; thread-compatible.
#ifndef LUMEN_WORKER_ENGINE_TEST_UTIL_H_
#define LUMEN_WORKER_ENGINE_TEST_UTIL_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace lumen::engine {

// `name` under the test's temporary directory ($TEST_TMPDIR, else /tmp).
inline std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

// Writes `n` uint16 tokens below `vocab` to TempPath(name): a learnable pattern with noise,
// the same for every call with the same arguments. Returns the path.
inline std::string WriteTokens(const std::string& name, int64_t n, int64_t vocab) {
  std::mt19937_64 rng(77);
  std::vector<uint16_t> toks(n);
  for (int64_t i = 0; i < n; ++i) {
    toks[i] = static_cast<uint16_t>(rng() % 4 == 0 ? rng() % vocab : (i * 7) % vocab);
  }
  const std::string path = TempPath(name);
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(toks.data(), 2, toks.size(), f);
  std::fclose(f);
  return path;
}

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_TEST_UTIL_H_
