// Fills a protobuf message from YAML by reflection: field names are the YAML keys, nested
// messages are maps, repeated fields are sequences, enums are their value names in lower case
// without the enum's prefix (TOKEN_DTYPE_UINT16 is written `uint16`). Thread-compatible.
#ifndef LUMEN_COMMON_YAML_PROTO_H_
#define LUMEN_COMMON_YAML_PROTO_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"

namespace lumen {

// Parses `yaml` into `message` (cleared first). Every error is INVALID_ARGUMENT and names the
// field path (`optimizer.betas[1]`), the line and the reason: unknown fields, wrong types,
// values out of range, YAML syntax errors.
absl::Status YamlToProto(absl::string_view yaml, google::protobuf::Message* message);

// The YAML spelling of an enum value (`uint16` for TOKEN_DTYPE_UINT16).
std::string EnumValueYamlName(const google::protobuf::EnumValueDescriptor* value);

}  // namespace lumen

#endif  // LUMEN_COMMON_YAML_PROTO_H_
