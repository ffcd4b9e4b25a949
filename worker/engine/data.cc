#include "worker/engine/data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lumen::engine {

uint64_t UniformBelow(std::mt19937_64& rng, uint64_t bound) {
  // limit = 2^64 - (2^64 mod bound); (0 - bound) % bound == 2^64 mod bound in uint64_t.
  const uint64_t rem = (uint64_t{0} - bound) % bound;
  while (true) {
    const uint64_t x = rng();
    if (rem == 0 || x < uint64_t{0} - rem) return x % bound;
  }
}

absl::StatusOr<std::unique_ptr<TokenDataset>> TokenDataset::Open(const DataConfig& config,
                                                                 int64_t seq_len,
                                                                 int64_t vocab_size) {
  if (seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("seq_len must be > 0, got ", seq_len));
  }
  const int fd = ::open(config.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return absl::NotFoundError(
        absl::StrCat("cannot open token file ", config.path, ": ", std::strerror(err)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(
        absl::StrCat("cannot stat token file ", config.path, ": ", std::strerror(err)));
  }
  const int64_t width = config.token_dtype == TokenDtype::kUint16 ? 2 : 4;
  const int64_t size = static_cast<int64_t>(st.st_size);
  if (size % width != 0) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "token file ", config.path, " has ", size, " bytes, not a multiple of ", width,
        " (token_dtype ", width == 2 ? "uint16" : "uint32", ")"));
  }
  const int64_t n = size / width;
  if (n <= seq_len + 1) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("token file ", config.path, " has ", n,
                                                   " tokens; seq_len ", seq_len, " needs more than ",
                                                   seq_len + 1));
  }
  return std::unique_ptr<TokenDataset>(new TokenDataset(config, fd, n, seq_len, vocab_size));
}

TokenDataset::TokenDataset(const DataConfig& config, int fd, int64_t num_tokens, int64_t seq_len,
                           int64_t vocab_size)
    : config_(config),
      fd_(fd),
      num_tokens_(num_tokens),
      seq_len_(seq_len),
      vocab_size_(vocab_size) {}

TokenDataset::~TokenDataset() { ::close(fd_); }

int64_t TokenDataset::WindowStart(int64_t i) {
  const int64_t t = seq_len_;
  if (config_.order == DataOrder::kSequential) {
    const uint64_t mod = static_cast<uint64_t>(num_tokens_ - t - 1);
    // (i * T) mod m without overflow: (i mod m) * (T mod m) mod m in 128-bit.
    const unsigned __int128 prod = static_cast<unsigned __int128>(static_cast<uint64_t>(i) % mod) *
                                   (static_cast<uint64_t>(t) % mod);
    return static_cast<int64_t>(prod % mod);
  }
  const int64_t k = (num_tokens_ - t - 1) / t + 1;
  const int64_t epoch = i / k;
  if (epoch != perm_epoch_) {
    perm_.resize(k);
    for (int64_t j = 0; j < k; ++j) perm_[j] = j;
    std::mt19937_64 rng(config_.seed + static_cast<uint64_t>(epoch) * 0x9E3779B97F4A7C15ull);
    for (int64_t j = k - 1; j >= 1; --j) {
      const uint64_t r = UniformBelow(rng, static_cast<uint64_t>(j + 1));
      std::swap(perm_[j], perm_[r]);
    }
    perm_epoch_ = epoch;
  }
  return perm_[i % k] * t;
}

absl::Status TokenDataset::ReadWindow(int64_t start, int32_t* inputs, int32_t* targets) {
  const int64_t width = config_.token_dtype == TokenDtype::kUint16 ? 2 : 4;
  const int64_t count = seq_len_ + 1;
  if (start < 0 || start + count > num_tokens_) {
    return absl::OutOfRangeError(absl::StrCat("window [", start, ", ", start + count,
                                              ") outside token file ", config_.path, " of ",
                                              num_tokens_, " tokens"));
  }
  raw_.resize(count * width);
  int64_t done = 0;
  while (done < count * width) {
    const ssize_t r = ::pread(fd_, raw_.data() + done, count * width - done, start * width + done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      return absl::DataLossError(absl::StrCat("short read of token file ", config_.path,
                                              " at byte ", start * width + done,
                                              r < 0 ? std::string(": ") + std::strerror(errno) : ""));
    }
    done += r;
  }
  for (int64_t j = 0; j < count; ++j) {
    const uint8_t* b = raw_.data() + j * width;
    uint32_t tok = static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 8);
    if (width == 4) tok |= (static_cast<uint32_t>(b[2]) << 16) | (static_cast<uint32_t>(b[3]) << 24);
    if (tok >= static_cast<uint64_t>(vocab_size_)) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", config_.path, ": token ", tok,
                                                     " at token offset ", start + j,
                                                     " is >= vocab_size ", vocab_size_));
    }
    if (j < seq_len_) inputs[j] = static_cast<int32_t>(tok);
    if (j > 0) targets[j - 1] = static_cast<int32_t>(tok);
  }
  return absl::OkStatus();
}

absl::Status TokenDataset::ReadBatch(int64_t step, int64_t micro, int64_t accum, int64_t batch,
                                     int32_t* inputs, int32_t* targets) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t i = (step * accum + micro) * batch + b;
    absl::Status s = ReadWindow(WindowStart(i), inputs + b * seq_len_, targets + b * seq_len_);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace lumen::engine
