#include "common/yaml_proto.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "yaml-cpp/yaml.h"

namespace lumen {
namespace {

using google::protobuf::EnumDescriptor;
using google::protobuf::EnumValueDescriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

std::string Where(const std::string& path, const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return path;
  return absl::StrCat(path, " (line ", mark.line + 1, ")");
}

absl::Status Error(const std::string& path, const YAML::Node& node, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(Where(path, node), ": ", why));
}

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Null:
      return "empty";
    case YAML::NodeType::Scalar:
      return absl::StrCat("'", node.Scalar(), "'");
    default:
      return "undefined";
  }
}

// Upper-snake form of a CamelCase enum type name: TokenDtype -> TOKEN_DTYPE.
std::string UpperSnake(absl::string_view camel) {
  std::string out;
  for (size_t i = 0; i < camel.size(); ++i) {
    const char c = camel[i];
    if (absl::ascii_isupper(c) && i > 0) out.push_back('_');
    out.push_back(absl::ascii_toupper(c));
  }
  return out;
}

absl::StatusOr<int64_t> ScalarInt(const std::string& path, const YAML::Node& node) {
  int64_t value = 0;
  const std::string text = node.Scalar();
  if (!absl::SimpleAtoi(text, &value)) {
    // Accept integral floats written like 1e6.
    double d = 0;
    if (absl::SimpleAtod(text, &d) && std::isfinite(d) && std::floor(d) == d &&
        std::fabs(d) < 9.0e18) {
      return static_cast<int64_t>(d);
    }
    return Error(path, node, absl::StrCat("expected an integer, got ", Describe(node)));
  }
  return value;
}

absl::Status SetScalar(const std::string& path, const YAML::Node& node, Message* msg,
                       const FieldDescriptor* field) {
  if (!node.IsScalar()) {
    return Error(path, node, absl::StrCat("expected a ", field->type_name(), " value, got ",
                                          Describe(node)));
  }
  const Reflection* refl = msg->GetReflection();
  const bool repeated = field->is_repeated();
  const std::string text = node.Scalar();
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32: {
      ASSIGN_OR_RETURN(int64_t v, ScalarInt(path, node));
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
        return Error(path, node, absl::StrCat(v, " is out of range for a 32-bit integer"));
      }
      repeated ? refl->AddInt32(msg, field, v) : refl->SetInt32(msg, field, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_INT64: {
      ASSIGN_OR_RETURN(int64_t v, ScalarInt(path, node));
      repeated ? refl->AddInt64(msg, field, v) : refl->SetInt64(msg, field, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_UINT32:
    case FieldDescriptor::CPPTYPE_UINT64: {
      ASSIGN_OR_RETURN(int64_t v, ScalarInt(path, node));
      if (v < 0) return Error(path, node, absl::StrCat(v, " must not be negative"));
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_UINT32) {
        repeated ? refl->AddUInt32(msg, field, v) : refl->SetUInt32(msg, field, v);
      } else {
        repeated ? refl->AddUInt64(msg, field, v) : refl->SetUInt64(msg, field, v);
      }
      break;
    }
    case FieldDescriptor::CPPTYPE_DOUBLE:
    case FieldDescriptor::CPPTYPE_FLOAT: {
      double v = 0;
      if (!absl::SimpleAtod(text, &v) || !std::isfinite(v)) {
        return Error(path, node, absl::StrCat("expected a finite number, got ", Describe(node)));
      }
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_DOUBLE) {
        repeated ? refl->AddDouble(msg, field, v) : refl->SetDouble(msg, field, v);
      } else {
        repeated ? refl->AddFloat(msg, field, v) : refl->SetFloat(msg, field, v);
      }
      break;
    }
    case FieldDescriptor::CPPTYPE_BOOL: {
      const std::string lower = absl::AsciiStrToLower(text);
      bool v;
      if (lower == "true" || lower == "yes" || lower == "on") {
        v = true;
      } else if (lower == "false" || lower == "no" || lower == "off") {
        v = false;
      } else {
        return Error(path, node, absl::StrCat("expected true or false, got ", Describe(node)));
      }
      repeated ? refl->AddBool(msg, field, v) : refl->SetBool(msg, field, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_STRING:
      repeated ? refl->AddString(msg, field, text) : refl->SetString(msg, field, text);
      break;
    case FieldDescriptor::CPPTYPE_ENUM: {
      const EnumDescriptor* type = field->enum_type();
      const std::string wanted = absl::AsciiStrToLower(text);
      std::vector<std::string> allowed;
      for (int i = 0; i < type->value_count(); ++i) {
        const EnumValueDescriptor* value = type->value(i);
        if (value->number() == 0) continue;  // UNSPECIFIED is never written.
        const std::string name = EnumValueYamlName(value);
        if (name == wanted) {
          repeated ? refl->AddEnum(msg, field, value) : refl->SetEnum(msg, field, value);
          return absl::OkStatus();
        }
        allowed.push_back(name);
      }
      return Error(path, node,
                   absl::StrCat(Describe(node), " is not one of ", absl::StrJoin(allowed, ", ")));
    }
    case FieldDescriptor::CPPTYPE_MESSAGE:
      return absl::InternalError("SetScalar called for a message field");
  }
  return absl::OkStatus();
}

absl::Status FillMessage(const std::string& prefix, const YAML::Node& node, Message* msg);

absl::Status FillField(const std::string& path, const YAML::Node& value, Message* msg,
                       const FieldDescriptor* field) {
  const Reflection* refl = msg->GetReflection();
  if (field->is_map()) {
    return Error(path, value, "map fields cannot be set from a job spec");
  }
  if (field->is_repeated()) {
    if (!value.IsSequence()) {
      return Error(path, value, absl::StrCat("expected a list, got ", Describe(value)));
    }
    for (size_t i = 0; i < value.size(); ++i) {
      const std::string item_path = absl::StrCat(path, "[", i, "]");
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        RETURN_IF_ERROR(FillMessage(item_path, value[i], refl->AddMessage(msg, field)));
      } else {
        RETURN_IF_ERROR(SetScalar(item_path, value[i], msg, field));
      }
    }
    return absl::OkStatus();
  }
  if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
    return FillMessage(path, value, refl->MutableMessage(msg, field));
  }
  return SetScalar(path, value, msg, field);
}

absl::Status FillMessage(const std::string& prefix, const YAML::Node& node, Message* msg) {
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsMap()) {
    return Error(prefix.empty() ? "spec" : prefix, node,
                 absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  const auto* descriptor = msg->GetDescriptor();
  for (const auto& entry : node) {
    if (!entry.first.IsScalar()) {
      return Error(prefix.empty() ? "spec" : prefix, entry.first, "keys must be plain names");
    }
    const std::string key = entry.first.Scalar();
    const std::string path = prefix.empty() ? key : absl::StrCat(prefix, ".", key);
    const FieldDescriptor* field = descriptor->FindFieldByName(key);
    if (field == nullptr) {
      std::vector<std::string> known;
      for (int i = 0; i < descriptor->field_count(); ++i) {
        known.push_back(descriptor->field(i)->name());
      }
      return Error(path, entry.first,
                   absl::StrCat("unknown field; known fields here: ", absl::StrJoin(known, ", ")));
    }
    if (entry.second.IsNull()) continue;
    RETURN_IF_ERROR(FillField(path, entry.second, msg, field));
  }
  return absl::OkStatus();
}

}  // namespace

std::string EnumValueYamlName(const EnumValueDescriptor* value) {
  const std::string prefix = UpperSnake(value->type()->name()) + "_";
  absl::string_view name = value->name();
  absl::ConsumePrefix(&name, prefix);
  return absl::AsciiStrToLower(name);
}

absl::Status YamlToProto(absl::string_view yaml, Message* message) {
  message->Clear();
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid YAML at line ", e.mark.line + 1, ", column ", e.mark.column + 1,
                     ": ", e.msg));
  }
  if (!root.IsDefined() || root.IsNull()) {
    return absl::InvalidArgumentError("the spec is empty");
  }
  try {
    return FillMessage("", root, message);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("invalid YAML: ", e.what()));
  }
}

}  // namespace lumen
