// Reading and writing safetensors files: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data buffer.
// Writes F32; reads F32, BF16 and F16 (converted to float). Free functions, thread-safe for
// distinct paths.
#ifndef LUMEN_WORKER_ENGINE_SAFETENSORS_H_
#define LUMEN_WORKER_ENGINE_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lumen::engine {

// Fills `dst` with a tensor's product(shape) floats: a tensor written from wherever it lives
// (a device, a memstore) one at a time, so a file never needs all of them in memory at once.
using TensorFill = std::function<absl::Status(float* dst)>;

// A tensor to write: `data` holds product(shape) floats and must outlive the call, or is null
// and `fill` provides them when the tensor's turn comes (into a buffer the writer owns).
struct TensorView {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
  TensorFill fill;
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

// A safetensors file mapped into memory, its header parsed and checked at Open (errors as
// ReadSafetensors's); each tensor is converted to float only when read, so a file larger than
// memory can be read one tensor at a time. Thread-compatible.
class SafetensorsReader {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names in name order.
  std::vector<std::string> names() const;
  // A tensor's shape or dtype in the file, or nullptr when it has no such tensor.
  const std::vector<int64_t>* shape(const std::string& name) const;
  const std::string* dtype(const std::string& name) const;
  // Converts tensor `name` into `dst` (product(shape) floats); NOT_FOUND naming the file
  // when it has no such tensor.
  absl::Status Read(const std::string& name, float* dst) const;

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    const char* data = nullptr;  // in the mapping
    uint64_t numel = 0;
  };
  SafetensorsReader() = default;
  std::string path_;
  void* mapped_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Entry> tensors_;
};

}  // namespace lumen::engine

#endif  // LUMEN_WORKER_ENGINE_SAFETENSORS_H_
