// A TensorHome backed by the memstore process: each tensor is a memstore tensor (float32) in
// the tier that OffloadOptions gives its class (host RAM or NVMe). Thread-safe when the
// client is (MemstoreClient implementations are).
#ifndef LUMEN_WORKER_MEMSTORE_TENSOR_HOME_H_
#define LUMEN_WORKER_MEMSTORE_TENSOR_HOME_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "memstore/memstore_client.h"
#include "worker/engine/tensor_home.h"

namespace lumen {

class MemstoreTensorHome : public engine::TensorHome {
 public:
  // `client` is not owned and must outlive this. Every id is prefixed with `prefix` (e.g.
  // "job-17/") so that jobs sharing a memstore do not collide.
  MemstoreTensorHome(MemstoreClient* client, std::string prefix);

  // Write / Read / Free of the memstore, errors as the client returns them; Get also fails
  // with FAILED_PRECONDITION when the stored tensor is not n floats (`data` may then hold
  // part of it).
  absl::Status Put(const std::string& id, const float* data, int64_t n,
                   engine::HomeTier tier) override;
  absl::Status Get(const std::string& id, float* data, int64_t n) override;
  absl::Status Free(const std::string& id) override;

  static Tier ToTier(engine::HomeTier tier);

  // Frees every tensor under this home's prefix followed by `under` (a job's state when the
  // job ends; "r1/": a data-parallel replica's own tensors), in one call; none when nothing was
  // put (a job that stayed on the device).
  absl::Status FreeAll(const std::string& under = "");

 private:
  MemstoreClient* const client_;
  const std::string prefix_;
  std::atomic<bool> put_any_{false};
};

}  // namespace lumen

#endif  // LUMEN_WORKER_MEMSTORE_TENSOR_HOME_H_
