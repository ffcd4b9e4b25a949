#include "coordinator/planner/hardware_profile.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/units.h"
#include "coordinator/planner/builtin_profiles.h"
#include "yaml-cpp/yaml.h"

namespace lumen {
namespace {

// One YAML field of a section: its name, whether it is required, and how to store it. The
// setter gets the scalar text and returns a reason on a bad value.
struct Field {
  const char* name;
  bool required;
  std::function<absl::Status(const std::string& text)> set;
};

absl::Status Bad(const std::string& text, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not ", want));
}

Field Int(const char* name, bool required, int* out, int min) {
  return {name, required, [out, min](const std::string& text) {
            int64_t v = 0;
            if (!absl::SimpleAtoi(text, &v)) return Bad(text, "an integer");
            if (v < min || v > (1 << 20)) return Bad(text, absl::StrCat("an integer >= ", min));
            *out = static_cast<int>(v);
            return absl::OkStatus();
          }};
}

// A positive rate given in `unit` (1e9 for GB/s, 1e12 for TFLOP/s).
Field Rate(const char* name, bool required, double* out, double unit) {
  return {name, required, [out, unit](const std::string& text) {
            double v = 0;
            if (!absl::SimpleAtod(text, &v) || !std::isfinite(v) || v <= 0) {
              return Bad(text, "a positive number");
            }
            *out = v * unit;
            return absl::OkStatus();
          }};
}

Field Fraction(const char* name, bool required, double* out) {
  return {name, required, [out](const std::string& text) {
            double v = 0;
            if (!absl::SimpleAtod(text, &v) || !(v > 0 && v <= 1)) {
              return Bad(text, "a fraction in (0, 1]");
            }
            *out = v;
            return absl::OkStatus();
          }};
}

Field Bytes(const char* name, bool required, int64_t* out) {
  return {name, required, [out](const std::string& text) {
            auto v = ParseBytes(text);
            if (!v.ok() || *v <= 0) return Bad(text, "a positive byte count such as 24GiB");
            *out = *v;
            return absl::OkStatus();
          }};
}

Field Bool(const char* name, bool required, bool* out) {
  return {name, required, [out](const std::string& text) {
            if (text == "true") {
              *out = true;
            } else if (text == "false") {
              *out = false;
            } else {
              return Bad(text, "true or false");
            }
            return absl::OkStatus();
          }};
}

Field Text(const char* name, bool required, std::string* out) {
  return {name, required, [out](const std::string& text) {
            *out = text;
            return absl::OkStatus();
          }};
}

std::string Where(absl::string_view source, const std::string& path, const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return absl::StrCat(source, ": ", path);
  return absl::StrCat(source, ": ", path, " (line ", mark.line + 1, ")");
}

absl::Status ParseSection(absl::string_view source, const std::string& prefix,
                          const YAML::Node& node, const std::vector<Field>& fields) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(source, prefix.empty() ? "(top level)" : prefix, node),
                     ": expected a mapping of field names to values"));
  }
  std::vector<std::string> names;
  for (const Field& f : fields) names.push_back(f.name);
  std::vector<bool> seen(fields.size(), false);
  for (const auto& entry : node) {
    const std::string key = entry.first.Scalar();
    const std::string path = prefix.empty() ? key : absl::StrCat(prefix, ".", key);
    size_t i = 0;
    while (i < fields.size() && key != fields[i].name) ++i;
    if (i == fields.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, path, entry.first), ": unknown field; known fields: ",
                       absl::StrJoin(names, ", ")));
    }
    if (seen[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, path, entry.first), ": given twice"));
    }
    seen[i] = true;
    if (fields[i].set == nullptr) continue;  // A section, parsed by the caller.
    if (!entry.second.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, path, entry.second), ": expected a single value"));
    }
    absl::Status status = fields[i].set(entry.second.Scalar());
    if (!status.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, path, entry.second), ": ", status.message()));
    }
  }
  for (size_t i = 0; i < fields.size(); ++i) {
    if (fields[i].required && !seen[i]) {
      const std::string path =
          prefix.empty() ? fields[i].name : absl::StrCat(prefix, ".", fields[i].name);
      return absl::InvalidArgumentError(absl::StrCat(source, ": ", path, " is required"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseRoot(absl::string_view source, const YAML::Node& root, HardwareProfile* hw) {
  const std::vector<Field> top = {Text("name", true, &hw->name),
                                  {"device", true, nullptr},
                                  {"host", true, nullptr},
                                  {"nvme", false, nullptr}};
  RETURN_IF_ERROR(ParseSection(source, "", root, top));
  DeviceProfile& d = hw->device;
  RETURN_IF_ERROR(ParseSection(
      source, "device", root["device"],
      {Text("kind", false, &d.kind), Int("count", true, &d.count, 1),
       Bytes("memory", true, &d.memory_bytes),
       Fraction("usable_memory_fraction", false, &d.usable_memory_fraction),
       Rate("peak_bf16_tflops", true, &d.peak_bf16_flops, 1e12),
       Rate("peak_fp32_tflops", true, &d.peak_fp32_flops, 1e12),
       Fraction("matmul_efficiency", false, &d.matmul_efficiency),
       Rate("memory_bandwidth_gb_per_s", true, &d.memory_bandwidth, 1e9),
       Rate("link_peak_gb_per_s", true, &d.link_peak, 1e9),
       Fraction("link_efficiency", false, &d.link_efficiency),
       Bool("peer_to_peer", false, &d.peer_to_peer)}));
  HostProfile& h = hw->host;
  RETURN_IF_ERROR(ParseSection(
      source, "host", root["host"],
      {Bytes("memory", true, &h.memory_bytes),
       Fraction("usable_memory_fraction", false, &h.usable_memory_fraction),
       Rate("memory_peak_gb_per_s", true, &h.memory_peak, 1e9),
       Fraction("memory_efficiency", false, &h.memory_efficiency),
       Rate("cpu_optimizer_params_per_s", true, &h.cpu_optimizer_params_per_s, 1.0)}));
  if (root["nvme"]) {
    NvmeProfile& n = hw->nvme;
    RETURN_IF_ERROR(ParseSection(
        source, "nvme", root["nvme"],
        {Int("drives", true, &n.drives, 0), Bytes("capacity_per_drive", true, &n.capacity_per_drive),
         Rate("read_gb_per_s_per_drive", true, &n.read_per_drive, 1e9),
         Rate("write_gb_per_s_per_drive", true, &n.write_per_drive, 1e9)}));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<HardwareProfile> ParseHardwareProfile(absl::string_view yaml,
                                                     absl::string_view source) {
  HardwareProfile hw;
  hw.source = std::string(source);
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not valid YAML: ", e.what()));
  }
  try {
    RETURN_IF_ERROR(ParseRoot(source, root, &hw));
  } catch (const YAML::Exception& e) {  // yaml-cpp throws on malformed nodes.
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
  return hw;
}

std::vector<std::string> BuiltinHardwareProfileNames() {
  std::vector<std::string> names;
  for (const auto* p = planner_internal::kBuiltinProfiles; p->name != nullptr; ++p) {
    names.push_back(p->name);
  }
  return names;
}

absl::StatusOr<HardwareProfile> LoadHardwareProfile(const std::string& name_or_path) {
  std::ifstream in(name_or_path);
  if (in) {
    std::stringstream text;
    text << in.rdbuf();
    return ParseHardwareProfile(text.str(), name_or_path);
  }
  for (const auto* p = planner_internal::kBuiltinProfiles; p->name != nullptr; ++p) {
    if (name_or_path == p->name || name_or_path == absl::StrCat(p->name, ".yaml")) {
      return ParseHardwareProfile(p->yaml, absl::StrCat("built-in ", p->name));
    }
  }
  return absl::NotFoundError(absl::StrCat(
      "hardware profile ", name_or_path, ": no such file and no built-in profile of that name (",
      absl::StrJoin(BuiltinHardwareProfileNames(), ", "), ")"));
}

}  // namespace lumen
