#include "worker/engine/tensor_home.h"

#include <functional>

#include "absl/time/clock.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lumen::engine {

const char *HomeTierName(HomeTier tier) { return tier == HomeTier::kNvme ? "nvme" : "host"; }

namespace {
int TierIndex(HomeTier tier) { return tier == HomeTier::kNvme ? 1 : 0; }
}  // namespace

absl::Status MemoryTensorHome::Put(const std::string &id, const float *data, int64_t n,
                                   HomeTier tier) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("put ", id, ": size ", n, " < 0"));
  absl::MutexLock lock(&mu_);
  Tensor &t = tensors_[id];
  stored_[TierIndex(t.tier)] -= static_cast<int64_t>(sizeof(float) * t.data.size());
  t.data.assign(data, data + n);
  t.tier = tier;
  const int i = TierIndex(tier);
  stored_[i] += static_cast<int64_t>(sizeof(float)) * n;
  peak_stored_[i] = std::max(peak_stored_[i], stored_[i]);
  bytes_in_ += static_cast<int64_t>(sizeof(float)) * n;
  return absl::OkStatus();
}

absl::Status MemoryTensorHome::Get(const std::string &id, float *data, int64_t n) {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(id);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor home has no tensor ", id));
  }
  if (static_cast<int64_t>(it->second.data.size()) != n) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tensor ", id, " holds ", it->second.data.size(), " floats; the caller asked for ", n));
  }
  if (n > 0) std::memcpy(data, it->second.data.data(), sizeof(float) * n);
  bytes_out_ += static_cast<int64_t>(sizeof(float)) * n;
  return absl::OkStatus();
}

absl::Status MemoryTensorHome::Free(const std::string &id) {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(id);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor home has no tensor ", id));
  }
  stored_[TierIndex(it->second.tier)] -=
      static_cast<int64_t>(sizeof(float) * it->second.data.size());
  tensors_.erase(it);
  return absl::OkStatus();
}

int64_t MemoryTensorHome::bytes_in() const {
  absl::MutexLock lock(&mu_);
  return bytes_in_;
}

int64_t MemoryTensorHome::bytes_out() const {
  absl::MutexLock lock(&mu_);
  return bytes_out_;
}

int64_t MemoryTensorHome::bytes_stored(HomeTier tier) const {
  absl::MutexLock lock(&mu_);
  return stored_[TierIndex(tier)];
}

int64_t MemoryTensorHome::peak_bytes_stored(HomeTier tier) const {
  absl::MutexLock lock(&mu_);
  return peak_stored_[TierIndex(tier)];
}

int64_t MemoryTensorHome::num_tensors() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(tensors_.size());
}

absl::Status MemoryTensorHome::TierOf(const std::string &id, HomeTier *tier) const {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(id);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor home has no tensor ", id));
  }
  *tier = it->second.tier;
  return absl::OkStatus();
}

namespace {

// Runs `transfer`, then sleeps until `bytes` would have crossed a link of `bytes_per_s`.
absl::Status Throttled(double bytes_per_s, int64_t bytes, double *busy_seconds,
                       const std::function<absl::Status()> &transfer) {
  const absl::Time start = absl::Now();
  absl::Status s = transfer();
  const absl::Duration link = absl::Seconds(static_cast<double>(bytes) / bytes_per_s);
  const absl::Duration left = link - (absl::Now() - start);
  if (left > absl::ZeroDuration()) absl::SleepFor(left);
  *busy_seconds += absl::ToDoubleSeconds(link);
  return s;
}

}  // namespace

ThrottledTensorHome::ThrottledTensorHome(TensorHome *inner, double bytes_per_s)
    : inner_(inner), bytes_per_s_(bytes_per_s) {}

absl::Status ThrottledTensorHome::Put(const std::string &id, const float *data, int64_t n,
                                      HomeTier tier) {
  absl::MutexLock lock(&put_mu_);
  return Throttled(bytes_per_s_, n * static_cast<int64_t>(sizeof(float)), &put_seconds_,
                   [&] { return inner_->Put(id, data, n, tier); });
}

absl::Status ThrottledTensorHome::Get(const std::string &id, float *data, int64_t n) {
  absl::MutexLock lock(&get_mu_);
  return Throttled(bytes_per_s_, n * static_cast<int64_t>(sizeof(float)), &get_seconds_,
                   [&] { return inner_->Get(id, data, n); });
}

absl::Status ThrottledTensorHome::Free(const std::string &id) { return inner_->Free(id); }

double ThrottledTensorHome::device_to_home_seconds() const {
  absl::MutexLock lock(&put_mu_);
  return put_seconds_;
}

double ThrottledTensorHome::home_to_device_seconds() const {
  absl::MutexLock lock(&get_mu_);
  return get_seconds_;
}

std::string AliasTable::Resolve(const std::string &id) const {
  absl::MutexLock lock(&mu_);
  auto it = aliases_.find(id);
  return it == aliases_.end() ? id : it->second;
}

void AliasTable::Set(const std::string &id, const std::string &stored) {
  absl::MutexLock lock(&mu_);
  if (stored == id) {
    aliases_.erase(id);
  } else {
    aliases_[id] = stored;
  }
}

std::string RenamedTensorHome::Stored(const std::string &id) const {
  for (const std::string &c : classes_) {
    if (id.rfind(c, 0) == 0) return prefix_ + id;
  }
  return id;
}

}  // namespace lumen::engine
