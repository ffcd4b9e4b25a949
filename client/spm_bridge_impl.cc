// liblumen_spm.so: SentencePiece behind spm_bridge::Api. No Abseil or protobuf header may be
// included here (see spm_bridge.h).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "client/spm_bridge.h"

namespace lumen::spm_bridge {
namespace {

Error Convert(const sentencepiece::util::Status& s) {
  if (s.ok()) return Error{};
  return Error{static_cast<int>(s.code()), s.message()};
}

class Model : public SpmModel {
 public:
  Error Load(const std::string& path) override { return Convert(sp_.Load(path)); }
  int size() const override { return sp_.GetPieceSize(); }
  int unk_id() const override { return sp_.unk_id(); }
  int PieceToId(const std::string& piece) const override { return sp_.PieceToId(piece); }
  Error Encode(const std::string& text, std::vector<int>* ids) const override {
    return Convert(sp_.Encode(text, ids));
  }
  Error Decode(const std::vector<int>& ids, std::string* text) const override {
    return Convert(sp_.Decode(ids, text));
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

SpmModel* NewModel() { return new Model(); }

Error Train(const std::unordered_map<std::string, std::string>& args, std::string* model) {
  return Convert(sentencepiece::SentencePieceTrainer::Train(args, nullptr, model));
}

const Api kApi = {&NewModel, &Train};

}  // namespace
}  // namespace lumen::spm_bridge

extern "C" __attribute__((visibility("default"))) const lumen::spm_bridge::Api*
LumenSpmBridgeApi() {
  return &lumen::spm_bridge::kApi;
}
