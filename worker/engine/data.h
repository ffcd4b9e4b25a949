// Reader of token files (raw little-endian uint16 or uint32 tokens, no header) that produces the
// training windows of DESIGN.md §7.
// Thread-safety: a TokenDataset is thread-compatible (ReadBatch mutates the cached shuffle
// permutation); use one per thread or synchronise externally.
#ifndef LUMEN_WORKER_ENGINE_DATA_H_
#define LUMEN_WORKER_ENGINE_DATA_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lumen::engine {

enum class TokenDtype { kUint16, kUint32 };
enum class DataOrder { kSequential, kShuffled };

struct DataConfig {
  std::string path;
  TokenDtype token_dtype = TokenDtype::kUint16;
  // kSequential: sample b of micro-batch a of step s starts at ((s*A + a)*B + b)*T mod (N-T-1).
  // kShuffled: see TokenDataset::WindowStart.
  DataOrder order = DataOrder::kSequential;
  // Used by kShuffled only.
  uint64_t seed = 0;
};

class TokenDataset {
 public:
  // Opens `config.path`. INVALID_ARGUMENT when the file size is not a multiple of the dtype
  // size or it holds N <= seq_len + 1 tokens; NOT_FOUND when it cannot be opened. Token ids are
  // checked against vocab_size lazily, per window read.
  static absl::StatusOr<std::unique_ptr<TokenDataset>> Open(const DataConfig& config,
                                                            int64_t seq_len, int64_t vocab_size);
  ~TokenDataset();

  int64_t num_tokens() const { return num_tokens_; }

  // Start token index of the window of global sample i = (s*A + a)*B + b.
  // Sequential: (i * T) mod (N - T - 1).
  // Shuffled: the K = (N - T - 1) / T + 1 windows start at k * T, k in [0, K) (every window
  // and its targets lie inside the file). Epoch e = i / K uses a permutation P_e of [0, K):
  // P_e starts as the identity and, with rng = std::mt19937_64(seed + e * 0x9E3779B97F4A7C15
  // mod 2^64), for j = K-1 down to 1 swaps P_e[j] with P_e[UniformBelow(rng, j + 1)]. The
  // window starts at P_e[i mod K] * T.
  int64_t WindowStart(int64_t sample_index);

  // Fills inputs/targets [batch * seq_len] for micro-batch `micro` of step `step` with
  // `accum` micro-batches per step. INVALID_ARGUMENT naming the file, token offset and value
  // when a token is >= vocab_size; DATA_LOSS on a short read.
  absl::Status ReadBatch(int64_t step, int64_t micro, int64_t accum, int64_t batch,
                         int32_t* inputs, int32_t* targets);

  // Reads one window [start, start + seq_len + 1) into inputs/targets.
  absl::Status ReadWindow(int64_t start, int32_t* inputs, int32_t* targets);

 private:
  TokenDataset(const DataConfig& config, int fd, int64_t num_tokens, int64_t seq_len,
               int64_t vocab_size);

  const DataConfig config_;
  const int fd_;
  const int64_t num_tokens_;
  const int64_t seq_len_;
  const int64_t vocab_size_;
  std::vector<uint8_t> raw_;  // scratch for one window
  int64_t perm_epoch_ = -1;
  std::vector<int64_t> perm_;
};

// Portable uniform integer in [0, bound), bound >= 1: draws x = rng() until
// x < 2^64 - (2^64 mod bound) and returns x mod bound.
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t bound);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_DATA_H_
