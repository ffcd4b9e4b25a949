// Reading and writing safetensors files: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data buffer.
// Writes F32; reads F32, BF16 and F16 (converted to float). Free functions, thread-safe for
// distinct paths.
#ifndef LUMEN_WORKER_ENGINE_SAFETENSORS_H_
#define LUMEN_WORKER_ENGINE_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lumen::engine {

// A tensor to write; `data` holds product(shape) floats and must outlive the call.
struct TensorView {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;
};

struct LoadedTensor {
  std::string dtype;  // dtype in the file: "F32", "BF16" or "F16"
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct SafetensorsFile {
  std::map<std::string, LoadedTensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Writes `tensors` (F32, in the given order) to `path` via a temporary file and rename, so a
// reader never sees a partial file. Names must be unique and not "__metadata__".
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Reads a whole file. INVALID_ARGUMENT naming the file and the problem for truncated files,
// bad JSON, unsupported dtypes, shapes that do not match the byte ranges and offsets outside
// the data; NOT_FOUND when the file cannot be opened.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// The "__metadata__" of a file, reading only its header; errors as ReadSafetensors's.
absl::StatusOr<std::map<std::string, std::string>> ReadSafetensorsMetadata(
    const std::string& path);

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_SAFETENSORS_H_
