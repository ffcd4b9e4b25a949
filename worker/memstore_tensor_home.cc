#include "worker/memstore_tensor_home.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace lumen {

MemstoreTensorHome::MemstoreTensorHome(MemstoreClient* client, std::string prefix)
    : client_(client), prefix_(std::move(prefix)) {}

Tier MemstoreTensorHome::ToTier(engine::HomeTier tier) {
  return tier == engine::HomeTier::kNvme ? TIER_NVME : TIER_HOST;
}

absl::Status MemstoreTensorHome::Put(const std::string& id, const float* data, int64_t n,
                                     engine::HomeTier tier) {
  put_any_.store(true);  // before the write: a failed one may have left an unfinished write
  return client_->Write(prefix_ + id, data, static_cast<int64_t>(sizeof(float)) * n, "float32",
                        ToTier(tier));
}

absl::Status MemstoreTensorHome::Get(const std::string& id, float* data, int64_t n) {
  const int64_t want = static_cast<int64_t>(sizeof(float)) * n;
  absl::StatusOr<int64_t> got = client_->Read(prefix_ + id, data, want);
  if (!got.ok()) return got.status();
  if (*got != want) {
    return absl::FailedPreconditionError(absl::StrCat("memstore tensor ", prefix_, id, " holds ",
                                                      *got, " bytes; expected ", want, " (", n,
                                                      " floats)"));
  }
  return absl::OkStatus();
}

absl::Status MemstoreTensorHome::Free(const std::string& id) {
  return client_->Free(prefix_ + id);
}

absl::Status MemstoreTensorHome::FreeAll(const std::string& under) {
  if (!put_any_.load()) return absl::OkStatus();
  // Bounded: at a node's stop the memstore may be stopping too, and the coordinator frees
  // whatever is left when the job ends or at its next start.
  return client_->FreeTensors(prefix_ + under, absl::Seconds(5)).status();
}

}  // namespace lumen
