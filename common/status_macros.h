// The two status macros Abseil 20220623 lacks. Header-only; thread-compatible.
#ifndef LUMEN_COMMON_STATUS_MACROS_H_
#define LUMEN_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LUMEN_STATUS_CONCAT_INNER_(a, b) a##b
#define LUMEN_STATUS_CONCAT_(a, b) LUMEN_STATUS_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the enclosing function when it is not OK.
#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status lumen_status_ = (expr);         \
    if (!lumen_status_.ok()) return lumen_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, Foo());` assigns the value of a StatusOr or returns its error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  LUMEN_ASSIGN_OR_RETURN_IMPL_(LUMEN_STATUS_CONCAT_(lumen_statusor_, __LINE__), lhs, expr)

#define LUMEN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

#endif  // LUMEN_COMMON_STATUS_MACROS_H_
