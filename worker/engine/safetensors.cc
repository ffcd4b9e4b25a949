#include "worker/engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/status_macros.h"

namespace lumen::engine {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100 << 20;

float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool f = true;
    for (const auto& [k, v] : metadata) {
      if (!f) header += ",";
      f = false;
      header += JsonQuote(k) + ":" + JsonQuote(v);
    }
    header += "}";
    first = false;
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const TensorView& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors ", path, ": duplicate or reserved tensor name ", t.name));
    }
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat("safetensors ", path, ": tensor ", t.name,
                                                       " has negative shape ",
                                                       ShapeString(t.shape)));
      }
      numel *= static_cast<uint64_t>(d);
    }
    if (!first) header += ",";
    first = false;
    header += absl::StrCat(JsonQuote(t.name), ":{\"dtype\":\"F32\",\"shape\":",
                           ShapeString(t.shape), ",\"data_offsets\":[", offset, ",",
                           offset + numel * 4, "]}");
    offset += numel * 4;
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';

  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  }
  uint8_t len[8];
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  absl::Status fill_status;
  std::vector<float> buffer;  // for tensors that fill themselves; the largest one's size
  for (const TensorView& t : tensors) {
    if (!ok) break;
    size_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<size_t>(d);
    const float* data = t.data;
    if (data == nullptr && numel > 0) {
      if (!t.fill) {
        fill_status = absl::InvalidArgumentError(
            absl::StrCat("safetensors ", path, ": tensor ", t.name, " has no data"));
        break;
      }
      if (buffer.size() < numel) buffer.resize(numel);
      fill_status = t.fill(buffer.data());
      if (!fill_status.ok()) break;
      data = buffer.data();
    }
    ok = numel == 0 || std::fwrite(data, sizeof(float), numel, f) == numel;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!fill_status.ok()) {
    std::remove(tmp.c_str());
    return fill_status;
  }
  if (!ok) {
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat("write to ", tmp, " failed: ", std::strerror(errno)));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::DataLossError(
        absl::StrCat("rename ", tmp, " -> ", path, " failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

SafetensorsReader::~SafetensorsReader() {
  if (mapped_ != nullptr) munmap(mapped_, size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path) {
  // Mapped, not read into memory: a checkpoint's optimizer state is 8 bytes per parameter,
  // and only the tensors being converted should take process memory.
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot open safetensors file ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::DataLossError(absl::StrCat("cannot stat ", path, ": ", std::strerror(err)));
  }
  std::unique_ptr<SafetensorsReader> r(new SafetensorsReader());
  r->path_ = path;
  r->size_ = static_cast<size_t>(st.st_size);
  void* mapped = r->size_ == 0 ? nullptr : mmap(nullptr, r->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (mapped == MAP_FAILED) {
    return absl::DataLossError(absl::StrCat("cannot map ", path, ": ", std::strerror(errno)));
  }
  r->mapped_ = mapped;
  if (mapped != nullptr) madvise(mapped, r->size_, MADV_SEQUENTIAL);
  const std::string_view bytes(static_cast<const char*>(mapped), r->size_);
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, ": ", what));
  };
  if (bytes.size() < 8) {
    return bad(absl::StrCat("truncated: ", bytes.size(), " bytes, need at least 8"));
  }
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) {
    header_len |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  }
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the file (", bytes.size(),
                            " bytes) or the 100 MiB limit"));
  }
  auto json = ParseJson(bytes.substr(8, header_len));
  if (!json.ok()) return bad(absl::StrCat("header: ", json.status().message()));
  if (json->type != JsonValue::Type::kObject) return bad("header is not a JSON object");
  const uint64_t data_begin = 8 + header_len;
  const uint64_t data_size = bytes.size() - data_begin;
  for (const auto& [name, entry] : json->object) {
    if (name == "__metadata__") {
      if (entry.type != JsonValue::Type::kObject) return bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.object) {
        if (v.type != JsonValue::Type::kString) {
          return bad(absl::StrCat("__metadata__ value of ", k, " is not a string"));
        }
        r->metadata_[k] = v.text;
      }
      continue;
    }
    const JsonValue* dtype = entry.Find("dtype");
    const JsonValue* shape = entry.Find("shape");
    const JsonValue* offsets = entry.Find("data_offsets");
    if (dtype == nullptr || dtype->type != JsonValue::Type::kString || shape == nullptr ||
        shape->type != JsonValue::Type::kArray || offsets == nullptr ||
        offsets->type != JsonValue::Type::kArray || offsets->array.size() != 2) {
      return bad(absl::StrCat("tensor ", name, " lacks dtype, shape or data_offsets [begin, end]"));
    }
    Entry t;
    t.dtype = dtype->text;
    uint64_t width;
    if (t.dtype == "F32") {
      width = 4;
    } else if (t.dtype == "BF16" || t.dtype == "F16") {
      width = 2;
    } else {
      return bad(absl::StrCat("tensor ", name, " has unsupported dtype ", t.dtype,
                              " (F32, BF16, F16 supported)"));
    }
    uint64_t numel = 1;
    for (const JsonValue& d : shape->array) {
      int64_t v;
      if (!d.AsInt64(&v) || v < 0 || v > (int64_t{1} << 40)) {
        return bad(absl::StrCat("tensor ", name, " has an invalid shape entry"));
      }
      t.shape.push_back(v);
      if (v != 0 && numel > (uint64_t{1} << 40) / static_cast<uint64_t>(v)) {
        return bad(absl::StrCat("tensor ", name, " shape is too large"));
      }
      numel *= static_cast<uint64_t>(v);
    }
    int64_t begin, end;
    if (!offsets->array[0].AsInt64(&begin) || !offsets->array[1].AsInt64(&end) || begin < 0 ||
        end < begin) {
      return bad(absl::StrCat("tensor ", name, " has invalid data_offsets"));
    }
    if (static_cast<uint64_t>(end) > data_size) {
      return bad(absl::StrCat("tensor ", name, " data_offsets [", begin, ", ", end,
                              "] out of range: data section has ", data_size, " bytes"));
    }
    if (static_cast<uint64_t>(end - begin) != numel * width) {
      return bad(absl::StrCat("tensor ", name, " shape ", ShapeString(t.shape), " of ", t.dtype,
                              " needs ", numel * width, " bytes but data_offsets span ",
                              end - begin));
    }
    t.data = bytes.data() + data_begin + begin;
    t.numel = numel;
    if (r->tensors_.count(name) != 0) return bad(absl::StrCat("duplicate tensor ", name));
    r->tensors_.emplace(name, std::move(t));
  }
  return r;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, entry] : tensors_) out.push_back(name);
  return out;
}

const std::vector<int64_t>* SafetensorsReader::shape(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.shape;
}

const std::string* SafetensorsReader::dtype(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.dtype;
}

absl::Status SafetensorsReader::Read(const std::string& name, float* dst) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", name));
  }
  const Entry& t = it->second;
  if (t.dtype == "F32") {
    std::memcpy(dst, t.data, t.numel * 4);
  } else {
    const bool bf16 = t.dtype == "BF16";
    for (uint64_t i = 0; i < t.numel; ++i) {
      const uint16_t h = static_cast<uint16_t>(static_cast<uint8_t>(t.data[2 * i]) |
                                               (static_cast<uint8_t>(t.data[2 * i + 1]) << 8));
      dst[i] = bf16 ? Bf16ToFloat(h) : F16ToFloat(h);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> reader, SafetensorsReader::Open(path));
  SafetensorsFile out;
  out.metadata = reader->metadata();
  for (const std::string& name : reader->names()) {
    LoadedTensor t;
    t.dtype = *reader->dtype(name);
    t.shape = *reader->shape(name);
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    t.data.resize(numel);
    RETURN_IF_ERROR(reader->Read(name, t.data.data()));
    out.tensors.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace lumen::engine
