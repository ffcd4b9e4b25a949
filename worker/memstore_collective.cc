#include "worker/memstore_collective.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"

namespace lumen {

MemstoreCollective::MemstoreCollective(MemstoreClient* memstore, std::string job_id, int rank,
                                       int size, std::function<bool()> cancelled,
                                       absl::Duration peer_timeout)
    : memstore_(memstore),
      job_id_(std::move(job_id)),
      rank_(rank),
      size_(size),
      cancelled_(std::move(cancelled)),
      peer_timeout_(peer_timeout) {}

int64_t MemstoreCollective::ClaimBytes(int64_t values, int64_t scalars) {
  return 2 * (values * static_cast<int64_t>(sizeof(float)) +
              scalars * static_cast<int64_t>(sizeof(double)));
}

std::string MemstoreCollective::Id(int64_t step, int rank) const {
  return absl::StrCat(Prefix(job_id_), step, "/", rank);
}

absl::Status MemstoreCollective::Await(int64_t step, int rank, std::vector<char>* out,
                                       int64_t bytes) {
  out->resize(bytes);
  const absl::Time deadline = absl::Now() + peer_timeout_;
  absl::Duration wait = absl::Microseconds(200);
  absl::Time next_check = absl::Now() + absl::Seconds(2);
  while (true) {
    absl::StatusOr<int64_t> got = memstore_->Read(Id(step, rank), out->data(), bytes);
    if (got.ok()) {
      if (*got != bytes) {
        return absl::InternalError(absl::StrCat("replica ", rank, " of ", job_id_, " sent ",
                                                *got, " bytes for step ", step, "; replica ",
                                                rank_, " expected ", bytes));
      }
      return absl::OkStatus();
    }
    if (!absl::IsNotFound(got.status())) return got.status();
    if (cancelled_ && cancelled_()) {
      return absl::CancelledError(
          absl::StrCat("cancelled while waiting for replica ", rank, "'s step ", step));
    }
    if (absl::Now() > next_check) {
      // The coordinator frees the exchange when the job's run ends (a replica failed, the job
      // was cancelled): this replica's own tensor of the step gone means nobody will come.
      next_check = absl::Now() + absl::Seconds(2);
      absl::StatusOr<int64_t> own = memstore_->Read(Id(step, rank_), out->data(), bytes);
      if (absl::IsNotFound(own.status())) {
        return absl::AbortedError(absl::StrCat("the run of ", job_id_, " ended while replica ",
                                               rank_, " waited for replica ", rank, "'s step ",
                                               step, " (the exchange was freed)"));
      }
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "replica ", rank, " of ", job_id_, " did not send its step ", step,
          " gradients within ", absl::FormatDuration(peer_timeout_)));
    }
    absl::SleepFor(wait);
    wait = std::min(wait * 2, absl::Milliseconds(20));
  }
}

absl::Status MemstoreCollective::SumAcrossReplicas(int64_t step, std::vector<float>* values,
                                                   std::vector<double>* scalars) {
  const int64_t value_bytes = static_cast<int64_t>(values->size() * sizeof(float));
  const int64_t bytes =
      value_bytes + static_cast<int64_t>(scalars->size() * sizeof(double));
  std::vector<char> mine(bytes);
  std::memcpy(mine.data(), values->data(), value_bytes);
  std::memcpy(mine.data() + value_bytes, scalars->data(), bytes - value_bytes);
  RETURN_IF_ERROR(memstore_->Write(Id(step, rank_), mine.data(), bytes, "uint8", TIER_HOST));
  // In rank order from replica 0's: every replica adds the same numbers the same way.
  std::vector<float> sum_values(values->size());
  std::vector<double> sum_scalars(scalars->size());
  std::vector<char> theirs;
  for (int r = 0; r < size_; ++r) {
    const char* bytes_of_r = mine.data();
    if (r != rank_) {
      RETURN_IF_ERROR(Await(step, r, &theirs, bytes));
      bytes_of_r = theirs.data();
    }
    const float* v = reinterpret_cast<const float*>(bytes_of_r);
    const double* s = reinterpret_cast<const double*>(bytes_of_r + value_bytes);
    if (r == 0) {
      std::copy(v, v + values->size(), sum_values.begin());
      std::copy(s, s + scalars->size(), sum_scalars.begin());
    } else {
      for (size_t i = 0; i < values->size(); ++i) sum_values[i] += v[i];
      for (size_t i = 0; i < scalars->size(); ++i) sum_scalars[i] += s[i];
    }
  }
  *values = std::move(sum_values);
  *scalars = std::move(sum_scalars);
  // Every replica has written this step, so each has read the previous one: that tensor of
  // ours is no longer needed.
  if (step > 0) {
    if (absl::Status s = memstore_->Free(Id(step - 1, rank_)); !s.ok() && !absl::IsNotFound(s)) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace lumen
