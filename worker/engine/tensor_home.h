// Where training tensors live off the device (host RAM, NVMe, a memstore): an
// interface the offload trainer moves float tensors through, and an in-process
// implementation for tests. Implementations are thread-safe.
#ifndef LUMEN_WORKER_ENGINE_TENSOR_HOME_H_
#define LUMEN_WORKER_ENGINE_TENSOR_HOME_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace lumen::engine {

// The off-device tier a tensor is kept in.
enum class HomeTier { kHost, kNvme };

// "host" or "nvme".
const char *HomeTierName(HomeTier tier);

class TensorHome {
 public:
  virtual ~TensorHome() = default;
  // Creates or replaces tensor `id` with the n floats at `data`, kept in
  // `tier`. On error the previous content of `id`, if any, may be lost.
  virtual absl::Status Put(const std::string &id, const float *data, int64_t n, HomeTier tier) = 0;
  // Copies tensor `id` into the n floats at `data`. NOT_FOUND when there is no
  // such tensor; FAILED_PRECONDITION when it does not hold exactly n floats
  // (nothing is copied then).
  virtual absl::Status Get(const std::string &id, float *data, int64_t n) = 0;
  // Deletes tensor `id`; NOT_FOUND when there is none.
  virtual absl::Status Free(const std::string &id) = 0;
};

// Tensors in a map in this process; counts the bytes that cross its interface.
class MemoryTensorHome : public TensorHome {
 public:
  absl::Status Put(const std::string &id, const float *data, int64_t n, HomeTier tier) override;
  absl::Status Get(const std::string &id, float *data, int64_t n) override;
  absl::Status Free(const std::string &id) override;

  // Bytes written by Put / read by Get since construction.
  int64_t bytes_in() const;
  int64_t bytes_out() const;
  // Bytes held now in `tier`, and the largest that ever was.
  int64_t bytes_stored(HomeTier tier) const;
  int64_t peak_bytes_stored(HomeTier tier) const;
  // Number of tensors held now.
  int64_t num_tensors() const;
  // The tier of tensor `id`, or NOT_FOUND.
  absl::Status TierOf(const std::string &id, HomeTier *tier) const;

 private:
  struct Tensor {
    std::vector<float> data;
    HomeTier tier = HomeTier::kHost;
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Tensor> tensors_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_in_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_out_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t stored_[2] ABSL_GUARDED_BY(mu_) = {0, 0};
  int64_t peak_stored_[2] ABSL_GUARDED_BY(mu_) = {0, 0};
};

// The link model (DESIGN §6): another home seen through a host<->device link of
// `bytes_per_s` per direction. Each transfer takes at least bytes / bytes_per_s
// (it sleeps for the rest), so the CPU device can run schedules at a GPU
// node's FLOPs-per-byte ratio. Thread-safe if `inner` is; transfers in the
// same direction are serialised, as on one link.
class ThrottledTensorHome : public TensorHome {
 public:
  // `inner` must outlive this; bytes_per_s > 0.
  ThrottledTensorHome(TensorHome *inner, double bytes_per_s);
  absl::Status Put(const std::string &id, const float *data, int64_t n, HomeTier tier) override;
  absl::Status Get(const std::string &id, float *data, int64_t n) override;
  absl::Status Free(const std::string &id) override;
  // Seconds the modelled link was busy, per direction.
  double device_to_home_seconds() const;
  double home_to_device_seconds() const;

 private:
  TensorHome *const inner_;
  const double bytes_per_s_;
  mutable absl::Mutex put_mu_, get_mu_;
  double put_seconds_ ABSL_GUARDED_BY(put_mu_) = 0;
  double get_seconds_ ABSL_GUARDED_BY(get_mu_) = 0;
};

// Which stored tensor an id names now. The offload trainer writes a step's AdamW results beside
// the current tensors while the step's gradient norm is not yet known, and keeps them by
// pointing the ids at them: no copy. An id without an alias names the tensor of that id.
// Thread-safe.
class AliasTable {
 public:
  // The stored tensor `id` names.
  std::string Resolve(const std::string &id) const;
  // From now on `id` names `stored` (`stored` == `id` removes the alias).
  void Set(const std::string &id, const std::string &stored);

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> aliases_ ABSL_GUARDED_BY(mu_);
};

// `inner` with ids resolved through `aliases` when each call runs. Thread-safe if `inner` is.
class AliasedTensorHome : public TensorHome {
 public:
  // Neither is owned; both must outlive this.
  AliasedTensorHome(TensorHome *inner, const AliasTable *aliases)
      : inner_(inner), aliases_(aliases) {}
  absl::Status Put(const std::string &id, const float *data, int64_t n, HomeTier tier) override {
    return inner_->Put(aliases_->Resolve(id), data, n, tier);
  }
  absl::Status Get(const std::string &id, float *data, int64_t n) override {
    return inner_->Get(aliases_->Resolve(id), data, n);
  }
  absl::Status Free(const std::string &id) override {
    return inner_->Free(aliases_->Resolve(id));
  }

 private:
  TensorHome *const inner_;
  const AliasTable *const aliases_;
};

// `inner` with the ids that start with one of `classes` (e.g. "grad/") stored as `prefix` + id,
// the others as they are: a data-parallel replica keeps its own gradients and activations
// under its own names beside the parameters and moments all replicas share. Thread-safe if
// `inner` is.
class RenamedTensorHome : public TensorHome {
 public:
  // `inner` is not owned and must outlive this.
  RenamedTensorHome(TensorHome *inner, std::string prefix, std::vector<std::string> classes)
      : inner_(inner), prefix_(std::move(prefix)), classes_(std::move(classes)) {}
  absl::Status Put(const std::string &id, const float *data, int64_t n, HomeTier tier) override {
    return inner_->Put(Stored(id), data, n, tier);
  }
  absl::Status Get(const std::string &id, float *data, int64_t n) override {
    return inner_->Get(Stored(id), data, n);
  }
  absl::Status Free(const std::string &id) override { return inner_->Free(Stored(id)); }
  // The id `id` is stored under in `inner`.
  std::string Stored(const std::string &id) const;

 private:
  TensorHome *const inner_;
  const std::string prefix_;
  const std::vector<std::string> classes_;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_TENSOR_HOME_H_
