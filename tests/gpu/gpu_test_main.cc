// gtest main of the GPU tests: without a usable CUDA device it prints why and exits 0
// (skipped); otherwise it runs the tests.
#include <cstdio>
#include <string>

#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  std::string why;
  if (lumen::gpu_test::GpuCount(&why) == 0) {
    std::printf("SKIPPED: no GPU: %s\n", why.c_str());
    return 0;
  }
  return RUN_ALL_TESTS();
}
