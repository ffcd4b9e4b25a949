// SentencePiece behind an interface in standard types, loaded at run time.
//
// Why: Debian's libsentencepiece carries its own copy of protobuf-lite, whose symbols clash
// with libprotobuf's when both are linked into one program (lumenctl crashes at startup), and
// its header declares an `absl::string_view` that clashes with Debian's Abseil. So
// SentencePiece lives in liblumen_spm.so (spm_bridge_impl.cc, which includes no Abseil or
// protobuf header), opened with RTLD_LOCAL | RTLD_DEEPBIND so that each library keeps its own
// protobuf. Use client/tokenizer.h rather than this. A loaded SpmModel is immutable and safe
// to use from several threads.
#ifndef LUMEN_CLIENT_SPM_BRIDGE_H_
#define LUMEN_CLIENT_SPM_BRIDGE_H_

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace lumen::spm_bridge {

// SentencePiece's status: `code` uses the canonical numbering (0 = OK, as absl::StatusCode).
struct Error {
  int code = 0;
  std::string message;
  bool ok() const { return code == 0; }
};

class SpmModel {
 public:
  virtual ~SpmModel() = default;
  virtual Error Load(const std::string& path) = 0;
  virtual int size() const = 0;
  virtual int unk_id() const = 0;
  // unk_id() when the model has no such piece.
  virtual int PieceToId(const std::string& piece) const = 0;
  virtual Error Encode(const std::string& text, std::vector<int>* ids) const = 0;
  virtual Error Decode(const std::vector<int>& ids, std::string* text) const = 0;
};

// What liblumen_spm.so exports (as the C symbol kApiSymbol).
struct Api {
  SpmModel* (*new_model)();
  // SentencePieceTrainer::Train with `args` (trainer flags without "--"); the model comes back
  // serialized in `model`.
  Error (*train)(const std::unordered_map<std::string, std::string>& args, std::string* model);
};

inline constexpr char kLibrary[] = "liblumen_spm.so";
inline constexpr char kApiSymbol[] = "LumenSpmBridgeApi";

// Opens liblumen_spm.so from the running program's directory (where Bazel puts it beside
// lumenctl and the tests), else from the library path, once per process. Returns null and sets
// *error when it cannot be opened.
const Api* LoadApi(std::string* error);

}  // namespace lumen::spm_bridge

#endif  // LUMEN_CLIENT_SPM_BRIDGE_H_
