// Linked only into the check.sh binaries, built on Debian 12 (glibc 2.36) for a GPU machine
// whose glibc may be older (Ubuntu 22.04: 2.35). The statically linked libstdc++ and libgcc
// reference two symbols that glibc added in 2.35/2.36; local definitions keep the binaries
// loadable on glibc >= 2.34. Neither path is used by our code: arc4random backs
// std::random_device("arc4random"); _dl_find_object speeds up exception unwinding (we throw
// none: returning -1 means "not found").
#include <sys/random.h>

#include <cstdint>

extern "C" uint32_t arc4random(void) {
  uint32_t v = 0;
  while (getrandom(&v, sizeof(v), 0) != sizeof(v)) {
  }
  return v;
}

extern "C" int _dl_find_object(void*, void*) { return -1; }
