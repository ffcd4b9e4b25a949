// lumenctl's commands, each a function returning the process exit code. Output goes to the
// given streams so tests can capture it.
#ifndef LUMEN_CLIENT_COMMANDS_H_
#define LUMEN_CLIENT_COMMANDS_H_

#include <ostream>

namespace lumen {

// Parses argv and runs the command it names.
int RunLumenctl(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace lumen

#endif  // LUMEN_CLIENT_COMMANDS_H_
