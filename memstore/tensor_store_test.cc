#include "memstore/tensor_store.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::vector<uint8_t> Bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

class TensorStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") /
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_);
  }

  TensorStoreOptions Options(int64_t nvme_capacity = 0) {
    TensorStoreOptions o;
    o.db_path = (root_ / "db").string();
    o.host_bytes = 4 << 20;
    o.nvme_dirs = {{(root_ / "nvme0").string(), nvme_capacity},
                   {(root_ / "nvme1").string(), nvme_capacity}};
    o.page_bytes = 16 << 10;  // small pages: every tensor spans both directories
    return o;
  }

  std::unique_ptr<TensorStore> Open(int64_t nvme_capacity = 0) {
    auto io = UringNvmeIo::Create({});
    EXPECT_TRUE(io.ok()) << io.status();
    auto store = TensorStore::Open(Options(nvme_capacity), std::move(*io));
    EXPECT_TRUE(store.ok()) << store.status();
    return std::move(*store);
  }

  std::vector<uint8_t> ReadAll(TensorStore& store, const std::string& id, absl::Status* status) {
    std::vector<uint8_t> out(1 << 20);
    auto n = store.Read(id, out.data(), out.size());
    *status = n.status();
    out.resize(n.ok() ? *n : 0);
    return out;
  }

  fs::path root_;
};

TEST_F(TensorStoreTest, WritesReadsAndMovesBetweenTiers) {
  auto store = Open();
  const auto a = Bytes(100000, 1);  // 7 pages, last one partial
  const auto b = Bytes(4096, 2);
  ASSERT_TRUE(store->Write("a", a.data(), a.size(), "f32", TIER_NVME).ok());
  ASSERT_TRUE(store->Write("b", b.data(), b.size(), "bf16", TIER_HOST).ok());
  absl::Status s;
  EXPECT_EQ(ReadAll(*store, "a", &s), a);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(ReadAll(*store, "b", &s), b);
  auto record = store->Lookup("a");
  ASSERT_TRUE(record.ok());
  EXPECT_EQ(record->pages_size(), 7);
  std::set<int> dirs;
  for (const auto& p : record->pages()) dirs.insert(p.dir());
  EXPECT_EQ(dirs.size(), 2u);  // striped

  ASSERT_TRUE(store->Move("a", TIER_HOST).ok());
  ASSERT_TRUE(store->Move("b", TIER_NVME).ok());
  EXPECT_EQ(ReadAll(*store, "a", &s), a);
  EXPECT_EQ(ReadAll(*store, "b", &s), b);
  EXPECT_EQ(store->Lookup("a")->tier(), TIER_HOST);
  EXPECT_EQ(store->Lookup("b")->tier(), TIER_NVME);
  // Page files of the moved-away tensor are gone.
  int files = 0;
  for (const char* d : {"nvme0", "nvme1"}) {
    for (const auto& f : fs::directory_iterator(root_ / d)) files += f.path().extension() == ".page";
  }
  EXPECT_EQ(files, 1);  // "b": one page

  // Replace keeps only the new generation.
  const auto a2 = Bytes(50000, 3);
  ASSERT_TRUE(store->Write("a", a2.data(), a2.size(), "f32", TIER_NVME).ok());
  EXPECT_EQ(ReadAll(*store, "a", &s), a2);
  EXPECT_EQ(store->Lookup("a")->generation(), 2);
  EXPECT_EQ(store->HostStats().used_bytes, 0);
  ASSERT_TRUE(store->Free("a").ok());
  EXPECT_EQ(store->Read("a", nullptr, 0).status().code(), absl::StatusCode::kNotFound);
}

// Flips bytes in or truncates NVMe page files: every read of an affected tensor fails with
// DATA_LOSS naming the tensor and the file, and no read ever returns wrong bytes.
TEST_F(TensorStoreTest, TensorIdsListsOneJobsTensors) {
  auto store = Open();
  const auto b = Bytes(64, 3);
  for (const char* id : {"job-1/a", "job-1/b", "job-10/a", "job-2/a", "job-1"}) {
    ASSERT_TRUE(store->Write(id, b.data(), b.size(), "f32", TIER_HOST).ok());
  }
  EXPECT_EQ(store->TensorIds("job-1/"), (std::vector<std::string>{"job-1/a", "job-1/b"}));
  EXPECT_EQ(store->TensorIds("job-3/"), std::vector<std::string>{});
  EXPECT_EQ(store->TensorIds("").size(), 5u);
}

TEST_F(TensorStoreTest, ThousandCorruptionTrialsNeverReturnWrongBytes) {
  auto store = Open();
  std::mt19937_64 rng(42);
  std::vector<std::vector<uint8_t>> data;
  for (int t = 0; t < 8; ++t) {
    data.push_back(Bytes(20000 + 3001 * t, 100 + t));
    ASSERT_TRUE(store->Write("t" + std::to_string(t), data[t].data(), data[t].size(), "u8",
                             TIER_NVME)
                    .ok());
  }
  auto io = UringNvmeIo::Create({});
  const int64_t header = (*io)->Alignment((root_ / "nvme0").string());
  int failures = 0, affected = 0;
  for (int trial = 0; trial < 1000; ++trial) {
    const int t = rng() % data.size();
    const std::string id = "t" + std::to_string(t);
    auto record = *store->Lookup(id);
    const auto& page = record.pages(rng() % record.pages_size());
    const fs::path file = root_ / ("nvme" + std::to_string(page.dir())) / page.file();
    const auto size = fs::file_size(file);
    const bool truncate = rng() % 4 == 0;
    // Bytes that matter: the header's fields (44 bytes, padded to 48) and the id after them, and
    // the page's data (not the padding). Any truncation is detected: the read comes up short.
    auto in_header = [&](int64_t at) {
      return at < 44 || (at >= 48 && at < 48 + static_cast<int64_t>(id.size()));
    };
    const int64_t data_end = header + page.size();
    if (truncate) {
      const int64_t at = rng() % size;
      fs::resize_file(file, at);
      affected += 1;
    } else {
      std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
      // Half the flips land in the data, the rest anywhere in the file.
      const int64_t at = rng() % 2 ? header + rng() % page.size() : rng() % size;
      affected += in_header(at) || (at >= header && at < data_end);
      f.seekg(at);
      char c;
      f.get(c);
      f.seekp(at);
      f.put(static_cast<char>(c ^ (1 << (rng() % 8))));
    }
    absl::Status s;
    const auto got = ReadAll(*store, id, &s);
    if (s.ok()) {
      // Only a flip in the padding after the data may go unnoticed; the bytes must be right.
      ASSERT_EQ(got, data[t]) << "trial " << trial << " returned wrong bytes";
    } else {
      ++failures;
      ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
      ASSERT_THAT(std::string(s.message()), HasSubstr("tensor " + id));
      ASSERT_THAT(std::string(s.message()), HasSubstr(page.file()));
    }
    ASSERT_TRUE(store->Write(id, data[t].data(), data[t].size(), "u8", TIER_NVME).ok());
  }
  EXPECT_EQ(failures, affected);
  EXPECT_GT(affected, 700);
  EXPECT_EQ(store->Counters().checksum_failures, failures);
}

TEST_F(TensorStoreTest, RestartKeepsNvmeTensorsAndReportsHostOnesLost) {
  const auto n = Bytes(70000, 5);
  const auto h = Bytes(9000, 6);
  {
    auto store = Open();
    ASSERT_TRUE(store->Write("on-nvme", n.data(), n.size(), "f32", TIER_NVME).ok());
    ASSERT_TRUE(store->Write("in-host", h.data(), h.size(), "f32", TIER_HOST).ok());
  }
  // A write that never committed leaves a page file behind; the restart removes it.
  std::ofstream(root_ / "nvme0" / "deadbeef.0.1.page") << "partial";
  auto store = Open();
  absl::Status s;
  EXPECT_EQ(ReadAll(*store, "on-nvme", &s), n);
  EXPECT_TRUE(s.ok()) << s;
  ReadAll(*store, "in-host", &s);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("in-host was in host memory"));
  EXPECT_EQ(store->LostTensors(), std::vector<std::string>{"in-host"});
  EXPECT_FALSE(fs::exists(root_ / "nvme0" / "deadbeef.0.1.page"));
  // A lost tensor can be written again.
  ASSERT_TRUE(store->Write("in-host", h.data(), h.size(), "f32", TIER_HOST).ok());
  EXPECT_EQ(ReadAll(*store, "in-host", &s), h);
}

TEST_F(TensorStoreTest, FullNvmeDirectoryIsResourceExhaustedAndNothingIsDamaged) {
  auto store = Open(/*nvme_capacity=*/256 << 10);
  std::vector<std::vector<uint8_t>> kept;
  absl::Status s;
  int i = 0;
  for (;; ++i) {
    auto bytes = Bytes(30000, 1000 + i);
    s = store->Write("f" + std::to_string(i), bytes.data(), bytes.size(), "u8", TIER_NVME);
    if (!s.ok()) break;
    kept.push_back(bytes);
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("NVMe tier"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("is full"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("of 262144 bytes used"));
  EXPECT_GT(kept.size(), 5u);
  for (size_t k = 0; k < kept.size(); ++k) {
    EXPECT_EQ(ReadAll(*store, "f" + std::to_string(k), &s), kept[k]);
  }
  // The failed tensor left nothing behind, and the store keeps serving.
  EXPECT_EQ(store->Lookup("f" + std::to_string(i)).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(store->Free("f0").ok());
  auto bytes = Bytes(30000, 9);
  EXPECT_TRUE(store->Write("again", bytes.data(), bytes.size(), "u8", TIER_NVME).ok());
}

TEST_F(TensorStoreTest, PinHoldsBytesInTheArenaAndBlocksMoves) {
  auto store = Open();
  const auto n = Bytes(50000, 11);
  ASSERT_TRUE(store->Write("n", n.data(), n.size(), "f32", TIER_NVME).ok());
  auto pinned = store->Pin("n");
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_TRUE(pinned->staged);
  EXPECT_EQ(pinned->size, 50000);
  EXPECT_TRUE(std::equal(n.begin(), n.end(), store->arena().data() + pinned->offset));
  std::atomic<bool> moved{false};
  std::thread mover([&] {
    EXPECT_TRUE(store->Move("n", TIER_HOST).ok());
    moved = true;
  });
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE(moved);  // waits for the pin
  store->Unpin("n", *pinned);
  mover.join();
  EXPECT_TRUE(moved);
  auto host = store->Pin("n");
  ASSERT_TRUE(host.ok());
  EXPECT_FALSE(host->staged);
  EXPECT_TRUE(std::equal(n.begin(), n.end(), store->arena().data() + host->offset));
  store->Unpin("n", *host);
  // A two-phase write: the caller fills the staging extent itself.
  auto offset = store->BeginWrite("w", 1000);
  ASSERT_TRUE(offset.ok());
  memset(store->arena().data() + *offset, 7, 1000);
  ASSERT_TRUE(store->CommitWrite("w", *offset, 1000, "u8", TIER_NVME).ok());
  std::vector<uint8_t> out(1000);
  ASSERT_TRUE(store->Read("w", out.data(), out.size()).ok());
  EXPECT_EQ(out, std::vector<uint8_t>(1000, 7));
  EXPECT_EQ(store->HostStats().used_bytes, 50000 + 4096 - 50000 % 4096);  // only "n"
}

TEST_F(TensorStoreTest, FreeWhileOthersWaitLeavesThemNotFound) {
  auto store = Open();
  const auto x = Bytes(8192, 12);
  ASSERT_TRUE(store->Write("x", x.data(), x.size(), "u8", TIER_HOST).ok());
  auto pinned = store->Pin("x");
  ASSERT_TRUE(pinned.ok());
  absl::Status freed, moved;
  std::thread freer([&] { freed = store->Free("x"); });
  absl::SleepFor(absl::Milliseconds(50));  // the freer now waits for the pin
  std::thread mover([&] { moved = store->Move("x", TIER_NVME); });
  absl::SleepFor(absl::Milliseconds(50));
  store->Unpin("x", *pinned);
  freer.join();
  mover.join();
  EXPECT_TRUE(freed.ok()) << freed;
  EXPECT_EQ(moved.code(), absl::StatusCode::kNotFound) << moved;
  std::vector<uint8_t> out(8192);
  EXPECT_EQ(store->Read("x", out.data(), out.size()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(TensorStoreTest, ConcurrentReadersWritersAndMovers) {
  auto store = Open();
  constexpr int kShared = 4;
  // Shared tensors hold a repeated byte per generation, so a torn read is detectable.
  for (int t = 0; t < kShared; ++t) {
    std::vector<uint8_t> v(40000, 0);
    ASSERT_TRUE(store->Write("s" + std::to_string(t), v.data(), v.size(), "u8", TIER_HOST).ok());
  }
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      std::vector<uint8_t> buf(1 << 20);
      for (int i = 0; i < 150 && !bad; ++i) {
        const std::string shared = "s" + std::to_string(rng() % kShared);
        const std::string own = "w" + std::to_string(w);
        const uint8_t fill = static_cast<uint8_t>(rng());
        switch (rng() % 4) {
          case 0: {
            std::vector<uint8_t> v(40000, fill);
            if (!store->Write(shared, v.data(), v.size(), "u8", rng() % 2 ? TIER_HOST : TIER_NVME)
                     .ok())
              bad = true;
            break;
          }
          case 1: {
            if (!store->Move(shared, rng() % 2 ? TIER_HOST : TIER_NVME).ok()) bad = true;
            break;
          }
          case 2: {
            auto n = store->Read(shared, buf.data(), buf.size());
            if (!n.ok() || *n != 40000) bad = true;
            for (int k = 1; k < 40000 && !bad; ++k) bad = buf[k] != buf[0];
            break;
          }
          default: {
            auto v = Bytes(10000 + i, w * 1000 + i);
            if (!store->Write(own, v.data(), v.size(), "u8", TIER_NVME).ok()) bad = true;
            auto n = store->Read(own, buf.data(), buf.size());
            if (!n.ok() || !std::equal(v.begin(), v.end(), buf.begin())) bad = true;
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(bad);
}

}  // namespace
}  // namespace lumen
