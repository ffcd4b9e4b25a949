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

// One step's line in `lumenctl submit --watch`, `watch` and `logs`: loss, rate, the predicted
// step time, and for an offloaded job the device's busy fraction and (where reads are counted,
// on the CPU device) the share prefetched in time.
std::string StepLine(const Job& job, const StepRecord& s);

// One worker's line in `lumenctl cluster`: name, device (with the GPU's name), budget and the
// measured figures of its kind of device.
std::string WorkerLine(const WorkerInfo& w);

}  // namespace lumen

#endif  // LUMEN_CLIENT_COMMANDS_H_
