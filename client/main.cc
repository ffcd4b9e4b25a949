// lumenctl: the command-line client of a Lumen node.
#include <iostream>

#include "client/commands.h"

int main(int argc, char** argv) { return lumen::RunLumenctl(argc, argv, std::cout, std::cerr); }
