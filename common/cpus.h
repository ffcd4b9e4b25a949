// How many CPUs this process may run on.
#ifndef LUMEN_COMMON_CPUS_H_
#define LUMEN_COMMON_CPUS_H_

namespace lumen {

// The CPUs in this process' affinity mask (a container's or taskset's share, not the host's
// count); at least 1.
int UsableCpus();

}  // namespace lumen

#endif  // LUMEN_COMMON_CPUS_H_
