// The memstore's control service: a thin gRPC layer over TensorStore. Disk work runs on an
// executor, never on gRPC's threads; tier moves run with bounded bytes in flight. Exports the
// store's figures as Prometheus metrics. Thread-safe.
#ifndef LUMEN_MEMSTORE_SERVICE_H_
#define LUMEN_MEMSTORE_SERVICE_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/executor.h"
#include "memstore/tensor_store.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {

struct MemstoreServiceOptions {
  // Threads doing disk I/O for the RPCs.
  int io_threads = 4;
  // Bytes of tier moves in flight at once; more queue behind them.
  int64_t move_bytes_in_flight = 256 << 20;
  // io_uring queue depth of the NVMe I/O, reported as a metric.
  int io_queue_depth = 16;
  // Measured tier figures, reported by GetStats.
  std::map<std::string, double> profile;
};

class MemstoreService final : public Memstore::CallbackService {
 public:
  // `store` must outlive the service. `data_plane` describes the UCX endpoint of the arena.
  MemstoreService(TensorStore* store, DataPlaneInfo data_plane, MemstoreServiceOptions options,
                  prometheus::Registry& registry);
  ~MemstoreService() override;

  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const GetMemstoreStatsRequest* request,
                                     GetMemstoreStatsReply* reply) override;
  grpc::ServerUnaryReactor* GetDataPlane(grpc::CallbackServerContext* context,
                                         const GetDataPlaneRequest* request,
                                         DataPlaneInfo* reply) override;
  grpc::ServerUnaryReactor* BeginWrite(grpc::CallbackServerContext* context,
                                       const BeginWriteRequest* request,
                                       BeginWriteReply* reply) override;
  grpc::ServerUnaryReactor* CommitWrite(grpc::CallbackServerContext* context,
                                        const CommitWriteRequest* request,
                                        CommitWriteReply* reply) override;
  grpc::ServerUnaryReactor* AbortWrite(grpc::CallbackServerContext* context,
                                       const AbortWriteRequest* request,
                                       AbortWriteReply* reply) override;
  grpc::ServerUnaryReactor* Pin(grpc::CallbackServerContext* context, const PinRequest* request,
                                PinReply* reply) override;
  grpc::ServerUnaryReactor* Unpin(grpc::CallbackServerContext* context,
                                  const UnpinRequest* request, UnpinReply* reply) override;
  grpc::ServerUnaryReactor* MoveTensor(grpc::CallbackServerContext* context,
                                       const MoveTensorRequest* request,
                                       MoveTensorReply* reply) override;
  grpc::ServerUnaryReactor* FreeTensor(grpc::CallbackServerContext* context,
                                       const FreeTensorRequest* request,
                                       FreeTensorReply* reply) override;
  grpc::ServerUnaryReactor* FreeTensors(grpc::CallbackServerContext* context,
                                        const FreeTensorsRequest* request,
                                        FreeTensorsReply* reply) override;

  // Refreshes the metrics from the store (also done once a second).
  void UpdateMetrics();

 private:
  // Runs `work` on `executor` (null: the I/O executor) and finishes the RPC with its status.
  grpc::ServerUnaryReactor* OnExecutor(grpc::CallbackServerContext* context,
                                       std::function<absl::Status()> work,
                                       Executor* executor = nullptr);

  TensorStore* const store_;
  const DataPlaneInfo data_plane_;
  const MemstoreServiceOptions options_;
  Executor executor_;
  // FreeTensors alone: it drops the pins and unfinished writes of clients that died, which
  // other clients' calls on the I/O executor may be waiting for.
  Executor reclaim_executor_;

  absl::Mutex mu_;
  int64_t next_pin_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<int64_t, std::pair<std::string, PinnedTensor>> pins_ ABSL_GUARDED_BY(mu_);
  // Staging offset -> tensor id of each two-phase write begun and not yet committed or aborted.
  std::map<int64_t, std::string> writes_ ABSL_GUARDED_BY(mu_);
  int64_t move_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  prometheus::Family<prometheus::Gauge>& capacity_;
  prometheus::Family<prometheus::Gauge>& used_;
  prometheus::Family<prometheus::Counter>& io_bytes_;
  prometheus::Counter& checksum_failures_;
  prometheus::Gauge& tensors_;
  prometheus::Gauge& lost_tensors_;
  prometheus::Gauge& fragmentation_;
  prometheus::Gauge& buffered_io_;
  prometheus::Gauge& moves_in_flight_bytes_;
  prometheus::Gauge& pins_gauge_;
  StoreCounters reported_ ABSL_GUARDED_BY(mu_);
  std::thread metrics_thread_;
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_SERVICE_H_
