#include "client/commands.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

TEST(WorkerLineTest, ShowsTheDeviceAndItsMeasuredFigures) {
  WorkerInfo cpu;
  cpu.set_name("worker-0");
  cpu.set_device("cpu");
  cpu.set_reachable(true);
  cpu.set_device_memory_budget_bytes(int64_t{1} << 30);
  (*cpu.mutable_profile())["fp32_gemm_flops"] = 2.5e11;
  (*cpu.mutable_profile())["copy_bytes_per_s"] = 1.6e10;
  EXPECT_THAT(WorkerLine(cpu), HasSubstr("worker-0     idle       cpu    budget 1.0 GiB"));
  EXPECT_THAT(WorkerLine(cpu), HasSubstr("measured: 250.0 GFLOP/s fp32 GEMM, 16.0 GB/s copies"));

  cpu.set_running_job("job-000007");
  EXPECT_THAT(WorkerLine(cpu), HasSubstr("worker-0     job-000007 cpu    budget 1.0 GiB"));

  WorkerInfo gpu = cpu;
  gpu.set_device("cuda");
  gpu.set_device_name("NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)");
  gpu.clear_profile();
  (*gpu.mutable_profile())["bf16_gemm_flops"] = 7.0e14;
  (*gpu.mutable_profile())["h2d_bytes_per_s"] = 5.2e10;
  EXPECT_THAT(WorkerLine(gpu), HasSubstr("cuda NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB) budget"));
  EXPECT_THAT(WorkerLine(gpu), HasSubstr("measured: 700.0 TFLOP/s bf16 GEMM, 52.0 GB/s"));

  WorkerInfo down;
  down.set_name("worker-1");
  down.set_error("connection refused");
  EXPECT_EQ(WorkerLine(down), "worker-1     unreachable: connection refused");
}

TEST(StepLineTest, OffloadedStepsShowTheBusyFractionAndPrefetchesWhereCounted) {
  Job job;
  job.set_id("job-000001");
  job.mutable_spec()->mutable_train()->set_steps(10);
  StepRecord s;
  s.set_step(3);
  s.set_loss(4.5);
  s.set_tokens_per_s(1000);
  s.set_step_time_s(1.2);
  EXPECT_THAT(StepLine(job, s), HasSubstr("job-000001 step 3/10  loss 4.5000"));
  EXPECT_THAT(StepLine(job, s), ::testing::Not(HasSubstr("busy")));  // resident
  // Streamed on the CPU device: reads from the memstore are counted.
  (*s.mutable_bytes_moved())["host->device"] = 1000;
  s.set_device_busy_fraction(0.9);
  s.set_prefetch_hit_rate(0.75);
  s.set_read_ahead_fraction(0.9);
  (*s.mutable_stall_seconds())["transfer"] = 0.1;
  (*s.mutable_stall_seconds())["optimizer"] = 0.0;
  EXPECT_THAT(StepLine(job, s), HasSubstr("busy 90%  read ahead 90% (75% in time)"));
  // Streamed on a GPU: no read counts, so no prefetch figure.
  s.mutable_stall_seconds()->erase("transfer");
  s.clear_prefetch_hit_rate();
  s.clear_read_ahead_fraction();
  EXPECT_THAT(StepLine(job, s), HasSubstr("busy 90%"));
  EXPECT_THAT(StepLine(job, s), ::testing::Not(HasSubstr("read ahead")));
}

}  // namespace
}  // namespace lumen
