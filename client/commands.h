// lumenctl's commands, each a function returning the process exit code. Output goes to the
// given streams so tests can capture it.
#ifndef LUMEN_CLIENT_COMMANDS_H_
#define LUMEN_CLIENT_COMMANDS_H_

#include <ostream>
#include <string>

#include "proto/lumen.pb.h"

namespace lumen {

// Parses argv and runs the command it names.
int RunLumenctl(int argc, char** argv, std::ostream& out, std::ostream& err);

// One worker's line in `lumenctl cluster`: name, device (with the GPU's name), budget and the
// measured figures of its kind of device.
std::string WorkerLine(const WorkerInfo& w);

}  // namespace lumen

#endif  // LUMEN_CLIENT_COMMANDS_H_
