#include "memstore/service.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "glog/logging.h"

namespace lumen {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

MemstoreService::MemstoreService(TensorStore* store, DataPlaneInfo data_plane,
                                 MemstoreServiceOptions options, prometheus::Registry& registry)
    : store_(store),
      data_plane_(std::move(data_plane)),
      options_(options),
      executor_(options.io_threads),
      reclaim_executor_(1),
      capacity_(prometheus::BuildGauge()
                    .Name("lumen_memstore_capacity_bytes")
                    .Help("Bytes the memstore may use, by tier")
                    .Register(registry)),
      used_(prometheus::BuildGauge()
                .Name("lumen_memstore_used_bytes")
                .Help("Bytes the memstore holds, by tier")
                .Register(registry)),
      io_bytes_(prometheus::BuildCounter()
                    .Name("lumen_memstore_io_bytes_total")
                    .Help("Tensor bytes read and written, by tier and direction (rate() gives "
                          "the bandwidth; nvme write is the drives' endurance budget)")
                    .Register(registry)),
      checksum_failures_(prometheus::BuildCounter()
                             .Name("lumen_memstore_checksum_failures_total")
                             .Help("NVMe page reads that failed verification (DATA_LOSS)")
                             .Register(registry)
                             .Add({})),
      tensors_(prometheus::BuildGauge()
                   .Name("lumen_memstore_tensors")
                   .Help("Tensors in the page table")
                   .Register(registry)
                   .Add({})),
      lost_tensors_(prometheus::BuildGauge()
                        .Name("lumen_memstore_lost_tensors")
                        .Help("Host-tier tensors lost in a memstore restart")
                        .Register(registry)
                        .Add({})),
      fragmentation_(prometheus::BuildGauge()
                         .Name("lumen_memstore_host_fragmentation")
                         .Help("1 - largest free extent / free bytes of the host arena")
                         .Register(registry)
                         .Add({})),
      buffered_io_(prometheus::BuildGauge()
                       .Name("lumen_memstore_buffered_io")
                       .Help("1 when an NVMe directory refused O_DIRECT and uses buffered I/O")
                       .Register(registry)
                       .Add({})),
      moves_in_flight_bytes_(prometheus::BuildGauge()
                                 .Name("lumen_memstore_move_bytes_in_flight")
                                 .Help("Bytes of tier moves under way")
                                 .Register(registry)
                                 .Add({})),
      pins_gauge_(prometheus::BuildGauge()
                      .Name("lumen_memstore_pins")
                      .Help("Tensors pinned by clients")
                      .Register(registry)
                      .Add({})) {
  prometheus::BuildGauge()
      .Name("lumen_memstore_io_queue_depth")
      .Help("io_uring queue depth of NVMe page I/O")
      .Register(registry)
      .Add({})
      .Set(options_.io_queue_depth);
  UpdateMetrics();
  metrics_thread_ = std::thread([this] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
        if (mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Seconds(1))) return;
      }
      UpdateMetrics();
    }
  });
}

MemstoreService::~MemstoreService() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  metrics_thread_.join();
}

void MemstoreService::UpdateMetrics() {
  for (const TierUsage& tier : store_->Usage()) {
    capacity_.Add({{"tier", tier.name}}).Set(static_cast<double>(tier.capacity_bytes));
    used_.Add({{"tier", tier.name}}).Set(static_cast<double>(tier.used_bytes));
  }
  const StoreCounters now = store_->Counters();
  absl::MutexLock lock(&mu_);
  auto add = [this](const char* tier, const char* direction, int64_t now, int64_t before) {
    io_bytes_.Add({{"tier", tier}, {"direction", direction}})
        .Increment(static_cast<double>(now - before));
  };
  add("host", "read", now.host_read_bytes, reported_.host_read_bytes);
  add("host", "write", now.host_write_bytes, reported_.host_write_bytes);
  add("nvme", "read", now.nvme_read_bytes, reported_.nvme_read_bytes);
  add("nvme", "write", now.nvme_write_bytes, reported_.nvme_write_bytes);
  checksum_failures_.Increment(
      static_cast<double>(now.checksum_failures - reported_.checksum_failures));
  reported_ = now;
  tensors_.Set(static_cast<double>(now.tensors));
  lost_tensors_.Set(static_cast<double>(now.lost_tensors));
  fragmentation_.Set(store_->HostStats().fragmentation);
  buffered_io_.Set(store_->used_buffered_io() ? 1 : 0);
  moves_in_flight_bytes_.Set(static_cast<double>(move_bytes_));
  pins_gauge_.Set(static_cast<double>(pins_.size()));
}

grpc::ServerUnaryReactor* MemstoreService::OnExecutor(grpc::CallbackServerContext* context,
                                                      std::function<absl::Status()> work,
                                                      Executor* executor) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  (executor != nullptr ? executor : &executor_)->Submit(
      [reactor, work = std::move(work)] { reactor->Finish(ToGrpcStatus(work())); });
  return reactor;
}

grpc::ServerUnaryReactor* MemstoreService::GetStats(grpc::CallbackServerContext* context,
                                                    const GetMemstoreStatsRequest* request,
                                                    GetMemstoreStatsReply* reply) {
  for (const TierUsage& usage : store_->Usage()) {
    TierInfo* tier = reply->add_tiers();
    tier->set_name(usage.name);
    tier->set_capacity_bytes(usage.capacity_bytes);
    tier->set_used_bytes(usage.used_bytes);
  }
  const StoreCounters counters = store_->Counters();
  reply->set_tensors(counters.tensors);
  reply->set_checksum_failures(counters.checksum_failures);
  reply->set_buffered_io(store_->used_buffered_io());
  for (const std::string& id : store_->LostTensors()) reply->add_lost_tensors(id);
  for (const auto& [key, value] : options_.profile) (*reply->mutable_profile())[key] = value;
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* MemstoreService::GetDataPlane(grpc::CallbackServerContext* context,
                                                        const GetDataPlaneRequest* request,
                                                        DataPlaneInfo* reply) {
  *reply = data_plane_;
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* MemstoreService::BeginWrite(grpc::CallbackServerContext* context,
                                                      const BeginWriteRequest* request,
                                                      BeginWriteReply* reply) {
  auto offset = store_->BeginWrite(request->tensor_id(), request->size());
  if (offset.ok()) {
    reply->set_offset(*offset);
    absl::MutexLock lock(&mu_);
    writes_[*offset] = request->tensor_id();
  }
  return Done(context, offset.status());
}

grpc::ServerUnaryReactor* MemstoreService::CommitWrite(grpc::CallbackServerContext* context,
                                                       const CommitWriteRequest* request,
                                                       CommitWriteReply* reply) {
  return OnExecutor(context, [this, request, reply]() -> absl::Status {
    {
      absl::MutexLock lock(&mu_);
      if (writes_.erase(request->offset()) == 0) {
        // Never begun, already committed or aborted, or reclaimed by FreeTensors.
        return absl::FailedPreconditionError(absl::StrCat(
            "commit of ", request->tensor_id(), ": no write in progress at offset ",
            request->offset()));
      }
    }
    absl::Status s = store_->CommitWrite(request->tensor_id(), request->offset(),
                                         request->size(), request->dtype(), request->tier());
    if (!s.ok()) return s;
    auto record = store_->Lookup(request->tensor_id());
    if (record.ok()) reply->set_generation(record->generation());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* MemstoreService::AbortWrite(grpc::CallbackServerContext* context,
                                                      const AbortWriteRequest* request,
                                                      AbortWriteReply* reply) {
  {
    absl::MutexLock lock(&mu_);
    // Already committed, aborted or reclaimed: nothing to release (idempotent).
    if (writes_.erase(request->offset()) == 0) return Done(context, absl::OkStatus());
  }
  store_->AbortWrite(request->offset());
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* MemstoreService::Pin(grpc::CallbackServerContext* context,
                                               const PinRequest* request, PinReply* reply) {
  return OnExecutor(context, [this, request, reply]() -> absl::Status {
    absl::StatusOr<PinnedTensor> pinned = store_->Pin(request->tensor_id());
    if (!pinned.ok()) return pinned.status();
    absl::MutexLock lock(&mu_);
    const int64_t pin = next_pin_++;
    pins_[pin] = {request->tensor_id(), *pinned};
    reply->set_pin(pin);
    reply->set_offset(pinned->offset);
    reply->set_size(pinned->size);
    reply->set_generation(pinned->generation);
    reply->set_dtype(pinned->dtype);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* MemstoreService::Unpin(grpc::CallbackServerContext* context,
                                                 const UnpinRequest* request, UnpinReply* reply) {
  std::pair<std::string, PinnedTensor> pinned;
  {
    absl::MutexLock lock(&mu_);
    auto it = pins_.find(request->pin());
    if (it == pins_.end()) return Done(context, absl::OkStatus());  // already unpinned
    pinned = it->second;
    pins_.erase(it);
  }
  store_->Unpin(pinned.first, pinned.second);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* MemstoreService::MoveTensor(grpc::CallbackServerContext* context,
                                                      const MoveTensorRequest* request,
                                                      MoveTensorReply* reply) {
  return OnExecutor(context, [this, request]() -> absl::Status {
    auto record = store_->Lookup(request->tensor_id());
    if (!record.ok()) return record.status();
    const int64_t bytes = std::min(record->size(), options_.move_bytes_in_flight);
    {
      absl::MutexLock lock(&mu_);
      auto room = [this, bytes]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return move_bytes_ + bytes <= options_.move_bytes_in_flight;
      };
      mu_.Await(absl::Condition(&room));
      move_bytes_ += bytes;
    }
    absl::Status s = store_->Move(request->tensor_id(), request->tier());
    absl::MutexLock lock(&mu_);
    move_bytes_ -= bytes;
    return s;
  });
}

grpc::ServerUnaryReactor* MemstoreService::FreeTensors(grpc::CallbackServerContext* context,
                                                       const FreeTensorsRequest* request,
                                                       FreeTensorsReply* reply) {
  if (request->prefix().empty()) {
    return Done(context, absl::InvalidArgumentError(
                             "FreeTensors needs a non-empty prefix (it would free every tensor)"));
  }
  // On its own thread: calls that wait for a tensor a dead client left pinned or half-written
  // can hold every I/O thread, and this is what releases them.
  return OnExecutor(context, [this, request, reply]() -> absl::Status {
    const std::string& prefix = request->prefix();
    auto under = [&prefix](const std::string& id) {
      return id.compare(0, prefix.size(), prefix) == 0;
    };
    std::vector<std::pair<std::string, PinnedTensor>> pins;
    std::vector<int64_t> writes;
    {
      absl::MutexLock lock(&mu_);
      for (auto it = pins_.begin(); it != pins_.end();) {
        if (!under(it->second.first)) {
          ++it;
          continue;
        }
        pins.push_back(it->second);
        it = pins_.erase(it);
      }
      for (auto it = writes_.begin(); it != writes_.end();) {
        if (!under(it->second)) {
          ++it;
          continue;
        }
        writes.push_back(it->first);
        it = writes_.erase(it);
      }
    }
    for (const auto& [id, pinned] : pins) store_->Unpin(id, pinned);
    for (int64_t offset : writes) store_->AbortWrite(offset);
    reply->set_pins(static_cast<int64_t>(pins.size()));
    reply->set_writes(static_cast<int64_t>(writes.size()));
    for (const std::string& id : store_->TensorIds(prefix)) {
      auto record = store_->Lookup(id);
      absl::Status s = store_->Free(id);
      if (absl::IsNotFound(s)) continue;  // freed meanwhile
      if (!s.ok()) return s;
      reply->set_tensors(reply->tensors() + 1);
      if (record.ok()) reply->set_bytes(reply->bytes() + record->size());
    }
    if (reply->tensors() + reply->pins() + reply->writes() > 0) {
      LOG(INFO) << "freed " << reply->tensors() << " tensors (" << reply->bytes()
                << " bytes) under " << prefix << ", dropped " << reply->pins() << " pins and "
                << reply->writes() << " unfinished writes";
    }
    return absl::OkStatus();
  }, &reclaim_executor_);
}

grpc::ServerUnaryReactor* MemstoreService::FreeTensor(grpc::CallbackServerContext* context,
                                                      const FreeTensorRequest* request,
                                                      FreeTensorReply* reply) {
  return OnExecutor(context, [this, request]() { return store_->Free(request->tensor_id()); });
}

}  // namespace lumen
