#include "coordinator/planner/node_profile.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/lumen.pb.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

GetClusterInfoReply Cluster() {
  GetClusterInfoReply c;
  c.set_data_dir("/var/lib/lumen");
  for (int i = 0; i < 2; ++i) {
    WorkerInfo* w = c.add_workers();
    w->set_name(i == 0 ? "worker-0" : "worker-1");
    w->set_device("cpu");
    w->set_reachable(true);
    w->set_device_memory_budget_bytes(64 << 20);
    w->set_optimizer_state_tier("nvme");
    auto& p = *w->mutable_profile();
    p["fp32_gemm_flops"] = 3e11;
    p["copy_bytes_per_s"] = 2e10;
    p["decoder_flops_per_s_h128"] = 1e11;
    p["decoder_flops_per_s_h512"] = 2e11;
    p["memstore_call_seconds"] = 5e-5;
  }
  TierInfo* host = c.add_tiers();
  host->set_name("host");
  host->set_capacity_bytes(int64_t{4} << 30);
  TierInfo* nvme = c.add_tiers();
  nvme->set_name("nvme:/mnt/a");
  nvme->set_capacity_bytes(int64_t{100} << 30);
  auto& m = *c.mutable_memstore_profile();
  m["host_copy_bytes_per_s"] = 1.5e10;
  m["optimizer_params_per_s"] = 4e8;
  m["nvme0_read_bytes_per_s"] = 2e9;
  m["nvme0_write_bytes_per_s"] = 1e9;
  return c;
}

TEST(NodeProfileTest, DecoderRateIsInterpolatedInLogHiddenSize) {
  const WorkerInfo w = Cluster().workers(0);
  EXPECT_DOUBLE_EQ(MeasuredDeviceFlops(w, 128), 1e11);
  EXPECT_DOUBLE_EQ(MeasuredDeviceFlops(w, 64), 1e11);     // flat below
  EXPECT_DOUBLE_EQ(MeasuredDeviceFlops(w, 4096), 2e11);   // and above
  EXPECT_NEAR(MeasuredDeviceFlops(w, 256), 1.5e11, 1e3);  // halfway in log2
  WorkerInfo old = w;
  old.mutable_profile()->erase("decoder_flops_per_s_h128");
  old.mutable_profile()->erase("decoder_flops_per_s_h512");
  EXPECT_DOUBLE_EQ(MeasuredDeviceFlops(old, 256), 3e11);  // older cache: sgemm
}

TEST(NodeProfileTest, BuildsTheProfileFromMeasuredFigures) {
  auto node = NodeHardwareProfile(Cluster(), 512);
  ASSERT_TRUE(node.ok()) << node.status();
  const HardwareProfile& hw = node->hardware;
  EXPECT_EQ(hw.name, "node");
  EXPECT_EQ(hw.device.count, 2);
  EXPECT_EQ(hw.device.BudgetBytes(), 64 << 20);
  EXPECT_DOUBLE_EQ(hw.device.MatmulFlops(false), 2e11);
  EXPECT_DOUBLE_EQ(hw.device.LinkBandwidth(), 2e10);  // no link model: copies
  EXPECT_TRUE(hw.device.shares_host_cpu);
  EXPECT_DOUBLE_EQ(hw.device.host_call_seconds, 5e-5);
  EXPECT_EQ(hw.host.UsableBytes(), int64_t{4} << 30);
  EXPECT_DOUBLE_EQ(hw.host.cpu_optimizer_params_per_s, 4e8);
  EXPECT_EQ(hw.nvme.drives, 1);
  EXPECT_DOUBLE_EQ(hw.nvme.read_per_drive, 2e9);
  EXPECT_EQ(node->device_budget_bytes, 64 << 20);
  EXPECT_TRUE(node->optimizer_state_on_nvme);

  GetClusterInfoReply linked = Cluster();
  linked.mutable_workers(0)->set_link_bytes_per_s(4e7);
  EXPECT_DOUBLE_EQ(NodeHardwareProfile(linked, 512)->hardware.device.LinkBandwidth(), 4e7);
}

TEST(NodeProfileTest, CudaWorkerFigures) {
  GetClusterInfoReply c = Cluster();
  for (WorkerInfo& w : *c.mutable_workers()) {
    w.set_device("cuda");
    auto& p = *w.mutable_profile();
    p.clear();
    p["bf16_gemm_flops"] = 6e14;
    p["h2d_bytes_per_s"] = 2.5e10;
    p["d2h_bytes_per_s"] = 2.4e10;
    p["copy_bytes_per_s"] = 1.5e12;
  }
  auto node = NodeHardwareProfile(c, 4096);
  ASSERT_TRUE(node.ok()) << node.status();
  const DeviceProfile& d = node->hardware.device;
  EXPECT_EQ(d.kind, "cuda (measured)");
  EXPECT_DOUBLE_EQ(d.MatmulFlops(false), 6e14);
  EXPECT_DOUBLE_EQ(d.LinkBandwidth(), 2.5e10);  // pinned host->device copies
  EXPECT_FALSE(d.shares_host_cpu);
}

TEST(NodeProfileTest, AWorkerRestartingAfterACrashStillCounts) {
  GetClusterInfoReply c = Cluster();
  c.mutable_workers(0)->set_reachable(false);
  c.mutable_workers(0)->clear_profile();
  auto node = NodeHardwareProfile(c, 512);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ(node->hardware.device.count, 2);
  EXPECT_DOUBLE_EQ(node->hardware.device.MatmulFlops(false), 2e11);  // worker-1's figures
}

TEST(NodeProfileTest, MissingFiguresSayWhy) {
  GetClusterInfoReply c = Cluster();
  for (WorkerInfo& w : *c.mutable_workers()) w.set_reachable(false);
  EXPECT_THAT(std::string(NodeHardwareProfile(c, 256).status().message()),
              HasSubstr("still starting"));
  c = Cluster();
  c.set_memstore_error("UNAVAILABLE: connection refused");
  EXPECT_THAT(std::string(NodeHardwareProfile(c, 256).status().message()),
              HasSubstr("connection refused"));
}

}  // namespace
}  // namespace lumen
