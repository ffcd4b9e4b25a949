// The YAML text of deploy/hardware/*.yaml, embedded at build time (see BUILD.bazel). Internal
// to the planner; thread-safe (constant data).
#ifndef LUMEN_COORDINATOR_PLANNER_BUILTIN_PROFILES_H_
#define LUMEN_COORDINATOR_PLANNER_BUILTIN_PROFILES_H_

namespace lumen::planner_internal {

struct BuiltinProfile {
  const char* name;  // file name without ".yaml"
  const char* yaml;
};

// Terminated by an entry whose name is nullptr.
extern const BuiltinProfile kBuiltinProfiles[];

}  // namespace lumen::planner_internal

#endif  // LUMEN_COORDINATOR_PLANNER_BUILTIN_PROFILES_H_
