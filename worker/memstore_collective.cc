#include "worker/memstore_collective.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"

namespace lumen {

MemstoreCollective::MemstoreCollective(MemstoreClient* memstore, std::string job_id, int64_t run,
                                       int rank, int size, std::function<bool()> cancelled,
                                       absl::Duration peer_timeout)
    : memstore_(memstore),
      job_id_(std::move(job_id)),
      run_(run),
      rank_(rank),
      size_(size),
      cancelled_(std::move(cancelled)),
      peer_timeout_(peer_timeout) {}

int64_t MemstoreCollective::ClaimBytes(int64_t values, int64_t scalars, int size) {
  // Parts of one step (every shard but its own) and its sums of two steps, each shard at most
  // one value longer than an even share, each tensor with the scalars and the step.
  const int64_t shard = values / size + 1;
  const int64_t extra = scalars * static_cast<int64_t>(sizeof(double)) + sizeof(int64_t);
  return (size - 1 + 2) * (shard * static_cast<int64_t>(sizeof(float)) + extra);
}

std::string MemstoreCollective::PartId(int64_t step, int rank, int shard) const {
  return absl::StrCat(Prefix(job_id_, run_), step, "/", rank, "/", shard);
}

std::string MemstoreCollective::SumId(int64_t step, int shard) const {
  return absl::StrCat(Prefix(job_id_, run_), step, "/sum/", shard);
}

absl::Status MemstoreCollective::Await(const std::string& id, const std::string& what,
                                       int64_t step, std::vector<char>* out, int64_t bytes,
                                       int64_t own_part_bytes) {
  out->resize(bytes);
  const absl::Time deadline = absl::Now() + peer_timeout_;
  absl::Duration wait = absl::Microseconds(200);
  absl::Time next_check = absl::Now() + absl::Seconds(2);
  // A tensor this replica wrote this step and frees only at its end.
  const std::string own = PartId(step, rank_, (rank_ + 1) % size_);
  std::vector<char> probe(own_part_bytes);
  while (true) {
    absl::StatusOr<int64_t> got = memstore_->Read(id, out->data(), bytes);
    if (got.ok()) {
      if (*got != bytes) {
        return absl::InternalError(absl::StrCat(what, " of ", job_id_, " for step ", step,
                                                " has ", *got, " bytes; replica ", rank_,
                                                " expected ", bytes));
      }
      return absl::OkStatus();
    }
    if (!absl::IsNotFound(got.status())) return got.status();
    if (cancelled_ && cancelled_()) {
      return absl::CancelledError(
          absl::StrCat("cancelled while waiting for ", what, " of step ", step));
    }
    if (absl::Now() > next_check) {
      // The coordinator frees the exchange when the job's run ends (a replica failed, the job
      // was cancelled): this replica's own tensor of the step gone means nobody will come.
      next_check = absl::Now() + absl::Seconds(2);
      absl::StatusOr<int64_t> mine = memstore_->Read(own, probe.data(), own_part_bytes);
      if (absl::IsNotFound(mine.status())) {
        return absl::AbortedError(absl::StrCat("the run of ", job_id_, " ended while replica ",
                                               rank_, " waited for ", what, " of step ", step,
                                               " (the exchange was freed)"));
      }
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, " of ", job_id_, " for step ", step,
                                                      " did not come within ",
                                                      absl::FormatDuration(peer_timeout_)));
    }
    absl::SleepFor(wait);
    wait = std::min(wait * 2, absl::Milliseconds(20));
  }
}

absl::Status MemstoreCollective::SumAcrossReplicas(int64_t step, absl::Span<float> values,
                                                   std::vector<double>* scalars) {
  const int64_t n = static_cast<int64_t>(values.size());
  const int64_t scalar_bytes = static_cast<int64_t>(scalars->size() * sizeof(double));
  // A part: the shard's values, the scalars, the step (so no tensor is ever empty).
  auto part_bytes = [&](const engine::MicroBatchShare& shard) {
    return shard.count * static_cast<int64_t>(sizeof(float)) + scalar_bytes +
           static_cast<int64_t>(sizeof(int64_t));
  };
  auto pack = [&](const float* shard_values, const engine::MicroBatchShare& shard,
                  const double* shard_scalars, std::vector<char>* out) {
    out->resize(part_bytes(shard));
    char* at = out->data();
    std::memcpy(at, shard_values, shard.count * sizeof(float));
    at += shard.count * sizeof(float);
    std::memcpy(at, shard_scalars, scalar_bytes);
    std::memcpy(at + scalar_bytes, &step, sizeof(step));
  };
  const int64_t own_part_bytes =
      part_bytes(engine::MicroBatchShareOf(n, (rank_ + 1) % size_, size_));
  // Reduce-scatter: this replica's values go out in `size_` contiguous shards (each with the
  // scalars); replica k sums shard k of every replica and publishes it; every replica then
  // reads the sums. Each replica reads about twice the values' bytes, whatever the size.
  std::vector<char> buf;
  for (int k = 0; k < size_; ++k) {
    if (k == rank_) continue;
    const engine::MicroBatchShare shard = engine::MicroBatchShareOf(n, k, size_);
    pack(values.data() + shard.first, shard, scalars->data(), &buf);
    RETURN_IF_ERROR(
        memstore_->Write(PartId(step, rank_, k), buf.data(), buf.size(), "uint8", TIER_HOST));
  }
  // Sum this replica's shard in rank order from replica 0's: every replica adds the same
  // numbers the same way, and only this one adds these.
  const engine::MicroBatchShare own = engine::MicroBatchShareOf(n, rank_, size_);
  std::vector<float> sum(own.count);
  std::vector<double> sum_scalars(scalars->size());
  for (int r = 0; r < size_; ++r) {
    const float* v = values.data() + own.first;
    const double* s = scalars->data();
    if (r != rank_) {
      RETURN_IF_ERROR(Await(PartId(step, r, rank_), absl::StrCat("replica ", r, "'s gradients"),
                            step, &buf, part_bytes(own), own_part_bytes));
      v = reinterpret_cast<const float*>(buf.data());
      s = reinterpret_cast<const double*>(buf.data() + own.count * sizeof(float));
    }
    if (r == 0) {
      std::copy(v, v + own.count, sum.begin());
      std::copy(s, s + scalars->size(), sum_scalars.begin());
    } else {
      for (int64_t i = 0; i < own.count; ++i) sum[i] += v[i];
      for (size_t i = 0; i < scalars->size(); ++i) sum_scalars[i] += s[i];
    }
  }
  // Every replica has written this step, so each has read the sums of the call before: ours
  // is no longer needed.
  if (last_step_ >= 0) {
    if (absl::Status s = memstore_->Free(SumId(last_step_, rank_));
        !s.ok() && !absl::IsNotFound(s)) {
      return s;
    }
  }
  last_step_ = step;
  pack(sum.data(), own, sum_scalars.data(), &buf);
  RETURN_IF_ERROR(memstore_->Write(SumId(step, rank_), buf.data(), buf.size(), "uint8", TIER_HOST));
  std::copy(sum.begin(), sum.end(), values.begin() + own.first);
  for (int k = 0; k < size_; ++k) {
    if (k == rank_) continue;
    const engine::MicroBatchShare shard = engine::MicroBatchShareOf(n, k, size_);
    RETURN_IF_ERROR(Await(SumId(step, k), absl::StrCat("replica ", k, "'s sum"), step, &buf,
                          part_bytes(shard), own_part_bytes));
    std::memcpy(values.data() + shard.first, buf.data(), shard.count * sizeof(float));
    if (k == 0) {
      std::memcpy(sum_scalars.data(), buf.data() + shard.count * sizeof(float), scalar_bytes);
    }
  }
  *scalars = std::move(sum_scalars);
  // Every shard's sum exists, so every replica has read this replica's parts of the step.
  for (int k = 0; k < size_; ++k) {
    if (k == rank_) continue;
    if (absl::Status s = memstore_->Free(PartId(step, rank_, k));
        !s.ok() && !absl::IsNotFound(s)) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace lumen
