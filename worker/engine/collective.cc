#include "worker/engine/collective.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lumen::engine {

MicroBatchShare MicroBatchShareOf(int64_t total, int rank, int size) {
  const int64_t base = total / size, extra = total % size;
  MicroBatchShare s;
  s.count = base + (rank < extra ? 1 : 0);
  s.first = rank * base + std::min<int64_t>(rank, extra);
  return s;
}

class LocalCollectives::Replica : public Collective {
 public:
  Replica(LocalCollectives* group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_->size_; }
  absl::Status SumAcrossReplicas(int64_t, absl::Span<float> values,
                                 std::vector<double>* scalars) override {
    return group_->Sum(rank_, values, scalars);
  }

 private:
  LocalCollectives* const group_;
  const int rank_;
};

LocalCollectives::LocalCollectives(int size)
    : size_(size), values_(size), scalars_(size) {
  for (int r = 0; r < size; ++r) members_.push_back(std::make_unique<Replica>(this, r));
}

LocalCollectives::~LocalCollectives() = default;

Collective* LocalCollectives::Member(int rank) { return members_[rank].get(); }

absl::Status LocalCollectives::Sum(int rank, absl::Span<float> values,
                                   std::vector<double>* scalars) {
  absl::MutexLock lock(&mu_);
  // A replica that comes back for the next step waits until every one has left this one.
  auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return arrived_ < size_; };
  mu_.Await(absl::Condition(&open));
  values_[rank].assign(values.begin(), values.end());
  scalars_[rank] = *scalars;
  ++arrived_;
  auto all = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return arrived_ == size_; };
  mu_.Await(absl::Condition(&all));
  absl::Status status;
  for (int r = 0; r < size_ && status.ok(); ++r) {
    if (values_[r].size() != values.size() || scalars_[r].size() != scalars->size()) {
      status = absl::InternalError(absl::StrCat("replica ", r, " sent ", values_[r].size(),
                                                " values; replica ", rank, " ",
                                                values.size()));
    }
  }
  if (status.ok()) {
    // In rank order, from replica 0's values: every replica adds the same numbers the same
    // way.
    std::copy(values_[0].begin(), values_[0].end(), values.begin());
    *scalars = scalars_[0];
    for (int r = 1; r < size_; ++r) {
      for (size_t i = 0; i < values.size(); ++i) values[i] += values_[r][i];
      for (size_t i = 0; i < scalars->size(); ++i) (*scalars)[i] += scalars_[r][i];
    }
  }
  if (++departed_ == size_) arrived_ = departed_ = 0;
  return status;
}

}  // namespace lumen::engine
