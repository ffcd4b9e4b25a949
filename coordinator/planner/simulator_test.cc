#include "coordinator/planner/simulator.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

// Round numbers: 1e12 FLOP/s, links 1e9 B/s, host memory 4e9 B/s, 2 drives of 1e9 read,
// 0.5e9 write, CPU optimizer 1e9 params/s.
HardwareProfile Hw(int workers) {
  HardwareProfile hw;
  hw.name = "hand";
  hw.device.count = workers;
  hw.device.memory_bytes = int64_t{1} << 30;
  hw.device.peak_bf16_flops = 1e12;
  hw.device.peak_fp32_flops = 1e12;
  hw.device.memory_bandwidth = 1e11;
  hw.device.link_peak = 1e9;
  hw.host.memory_bytes = int64_t{1} << 34;
  hw.host.memory_peak = 4e9;
  hw.host.cpu_optimizer_params_per_s = 1e9;
  hw.nvme.drives = 2;
  hw.nvme.capacity_per_drive = int64_t{1} << 40;
  hw.nvme.read_per_drive = 1e9;
  hw.nvme.write_per_drive = 0.5e9;
  return hw;
}

Op Transfer(int worker, Lane lane, Tier src, Tier dst, int64_t bytes, std::vector<int32_t> deps) {
  Op op;
  op.kind = OpKind::kTransfer;
  op.worker = worker;
  op.lane = lane;
  op.src = src;
  op.dst = dst;
  op.bytes = bytes;
  op.deps = std::move(deps);
  return op;
}

Op Compute(int worker, double flops, std::vector<int32_t> deps) {
  Op op;
  op.kind = OpKind::kCompute;
  op.worker = worker;
  op.lane = Lane::kCompute;
  op.flops = flops;
  op.deps = std::move(deps);
  return op;
}

// Two layers: prefetch 1 s each, compute 2 s each; the second prefetch overlaps the first
// compute. Step = 1 + 2 + 2 = 5 s; compute busy 4/5, link 2/5, host memory 2 GB / 4 GB/s / 5 s.
TEST(SimulatorTest, TwoLayersHandChecked) {
  Schedule s;
  const int p0 = s.Add(Transfer(0, Lane::kHostToDevice, Tier::kHost, Tier::kDevice, 1e9, {}));
  const int p1 = s.Add(Transfer(0, Lane::kHostToDevice, Tier::kHost, Tier::kDevice, 1e9, {}));
  const int c0 = s.Add(Compute(0, 2e12, {p0}));
  const int c1 = s.Add(Compute(0, 2e12, {p1}));
  auto r = Simulate(s, Hw(1), true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_DOUBLE_EQ(r->step_time_s, 5.0);
  EXPECT_DOUBLE_EQ(r->op_end_s[p1], 2.0);
  EXPECT_DOUBLE_EQ(r->op_start_s[c1], 3.0);
  EXPECT_DOUBLE_EQ(r->op_end_s[c0], 3.0);
  EXPECT_DOUBLE_EQ(r->device_busy_fraction, 0.8);
  EXPECT_EQ(r->binding_resource, "device compute");
  EXPECT_DOUBLE_EQ(r->binding_busy_fraction, 0.8);
  for (const ResourceUsage& u : r->resources) {
    if (u.name == "worker-0 link h2d") { EXPECT_DOUBLE_EQ(u.busy_fraction, 0.4); }
    if (u.name == "host memory") { EXPECT_DOUBLE_EQ(u.busy_fraction, 0.1); }
  }
  EXPECT_EQ(r->bytes_moved.at("host->device"), 2'000'000'000);
}

// Two workers pull 2 GB each through a 1 GB/s link but share 1 GB/s of host memory: each gets
// 0.5 GB/s, so both finish at 4 s, host memory 100% busy and binding.
TEST(SimulatorTest, WorkersContendForHostMemory) {
  HardwareProfile hw = Hw(2);
  hw.host.memory_peak = 1e9;
  Schedule s;
  s.num_workers = 2;
  s.Add(Transfer(0, Lane::kHostToDevice, Tier::kHost, Tier::kDevice, 2e9, {}));
  s.Add(Transfer(1, Lane::kHostToDevice, Tier::kHost, Tier::kDevice, 2e9, {}));
  auto r = Simulate(s, hw, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->step_time_s, 4.0, 1e-9);
  EXPECT_EQ(r->binding_resource, "host memory");
  EXPECT_NEAR(r->binding_busy_fraction, 1.0, 1e-9);
}

// NVMe: 2 GB read striped over 2 drives of 1 GB/s = 1 s; then 1 GB written at 2 × 0.5 = 1 s;
// CPU optimizer of 1e9 params = 1 s in between. Reads and writes share a drive.
TEST(SimulatorTest, NvmeAndCpuOptimizer) {
  Schedule s;
  const int read = s.Add(Transfer(-1, Lane::kNvmeOptimizer, Tier::kNvme, Tier::kHost, 2e9, {}));
  Op opt;
  opt.kind = OpKind::kOptimizer;
  opt.lane = Lane::kHostCpu;
  opt.params = 1'000'000'000;
  opt.deps = {read};
  const int upd = s.Add(opt);
  s.Add(Transfer(-1, Lane::kNvmeWriteBack, Tier::kHost, Tier::kNvme, 1e9, {upd}));
  auto r = Simulate(s, Hw(1), true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->step_time_s, 3.0, 1e-9);
  EXPECT_EQ(r->nvme_bytes_written, 1'000'000'000);
  EXPECT_EQ(r->nvme_bytes_read, 2'000'000'000);
  for (const ResourceUsage& u : r->resources) {
    if (u.group == "nvme") { EXPECT_NEAR(u.busy_fraction, 2.0 / 3, 1e-9); }
    if (u.group == "cpu optimizer") { EXPECT_NEAR(u.busy_fraction, 1.0 / 3, 1e-9); }
  }
}

TEST(SimulatorTest, DeadlockNamesTheStuckOp) {
  Schedule s;
  Op a = Compute(0, 1e12, {1});
  a.label = "fwd a";
  Op b = Compute(0, 1e12, {});
  b.label = "fwd b";
  s.Add(a);
  s.Add(b);  // behind `a` on the compute lane, which waits for it
  auto r = Simulate(s, Hw(1), true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("op 0 (fwd a) on lane 0/compute waits for op 1"));
}

TEST(SimulatorTest, UnknownWorkerIsAnError) {
  Schedule s;
  s.Add(Compute(3, 1, {}));
  EXPECT_THAT(Simulate(s, Hw(1), true).status().message(),
              HasSubstr("runs on worker 3 but the schedule has 1 workers"));
}

// A CPU device computes on the host's cores: a transfer's memstore calls (and the host
// optimizer's arithmetic) take from its compute. Compute 2 s alone; a concurrent prefetch
// with 1000 calls of 1 ms adds 1 s of the same resource: 3 s. A GPU profile ignores the calls.
TEST(SimulatorTest, CpuDevicePaysForMemstoreCalls) {
  Schedule s;
  Op fetch = Transfer(0, Lane::kHostToDevice, Tier::kHost, Tier::kDevice, 1000, {});
  fetch.host_calls = 1000;
  s.Add(std::move(fetch));
  s.Add(Compute(0, 2e12, {}));
  HardwareProfile hw = Hw(1);
  auto gpu = Simulate(s, hw, true);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_NEAR(gpu->step_time_s, 2.0, 1e-6);
  hw.device.shares_host_cpu = true;
  hw.device.host_call_seconds = 1e-3;
  auto cpu = Simulate(s, hw, true);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_NEAR(cpu->step_time_s, 3.0, 1e-6);
}

}  // namespace
}  // namespace lumen
