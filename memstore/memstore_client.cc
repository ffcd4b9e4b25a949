#include "memstore/memstore_client.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "grpcpp/client_context.h"
#include "memstore/ucx_transport.h"
#include "proto/lumen.grpc.pb.h"

namespace lumen {
namespace {

constexpr absl::Duration kCallTimeout = absl::Minutes(10);  // NVMe moves of large tensors

// Calls wait (until the deadline) for a memstore that is starting or restarting, rather than
// failing at once: lumend starts the processes together and restarts a crashed memstore.
void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  context->set_wait_for_ready(true);
}

}  // namespace

GrpcMemstoreClient::GrpcMemstoreClient(const std::string& socket)
    : channel_(*LocalChannel(UnixTarget(socket))) {}

GrpcMemstoreClient::~GrpcMemstoreClient() = default;

absl::StatusOr<GetMemstoreStatsReply> GrpcMemstoreClient::GetStats(absl::Duration timeout) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  GetMemstoreStatsReply reply;
  grpc::Status status = Memstore::NewStub(channel_)->GetStats(&context, {}, &reply);
  if (!status.ok()) return FromGrpcStatus(status);
  return reply;
}

absl::Status GrpcMemstoreClient::EnsureDataPlane() {
  if (ucx_ != nullptr) return absl::OkStatus();
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(30));
  DataPlaneInfo info;
  grpc::Status status = Memstore::NewStub(channel_)->GetDataPlane(&context, {}, &info);
  if (!status.ok()) return FromGrpcStatus(status);
  auto client = UcxClient::Create();
  if (!client.ok()) return client.status();
  UcxEndpointInfo remote;
  remote.worker_address = info.worker_address();
  remote.rkey = info.rkey();
  remote.base_address = info.base_address();
  remote.length = info.length();
  if (absl::Status s = (*client)->Connect(remote); !s.ok()) return s;
  ucx_ = std::move(*client);
  return absl::OkStatus();
}

absl::Status GrpcMemstoreClient::Write(const std::string& id, const void* data, int64_t size,
                                       const std::string& dtype, Tier tier) {
  auto stub = Memstore::NewStub(channel_);
  BeginWriteRequest begin;
  begin.set_tensor_id(id);
  begin.set_size(size);
  BeginWriteReply staged;
  {
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(30));
    grpc::Status status = stub->BeginWrite(&context, begin, &staged);
    if (!status.ok()) return FromGrpcStatus(status);
  }
  absl::Status put;
  {
    absl::MutexLock lock(&ucx_mu_);
    put = EnsureDataPlane();
    if (put.ok()) put = ucx_->Put(data, staged.offset(), size);
  }
  if (!put.ok()) {
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(30));
    AbortWriteRequest abort;
    abort.set_offset(staged.offset());
    AbortWriteReply ignored;
    (void)stub->AbortWrite(&context, abort, &ignored);
    return put;
  }
  grpc::ClientContext context;
  SetDeadline(&context, kCallTimeout);
  CommitWriteRequest commit;
  commit.set_tensor_id(id);
  commit.set_offset(staged.offset());
  commit.set_size(size);
  commit.set_dtype(dtype);
  commit.set_tier(tier);
  CommitWriteReply reply;
  return FromGrpcStatus(stub->CommitWrite(&context, commit, &reply));
}

absl::StatusOr<int64_t> GrpcMemstoreClient::Read(const std::string& id, void* dst,
                                                 int64_t capacity) {
  auto stub = Memstore::NewStub(channel_);
  PinRequest pin_request;
  pin_request.set_tensor_id(id);
  PinReply pin;
  {
    grpc::ClientContext context;
    SetDeadline(&context, kCallTimeout);
    grpc::Status status = stub->Pin(&context, pin_request, &pin);
    if (!status.ok()) return FromGrpcStatus(status);
  }
  absl::Status got;
  if (pin.size() > capacity) {
    got = absl::InvalidArgumentError(absl::StrCat("tensor ", id, " has ", pin.size(),
                                                  " bytes; the buffer holds ", capacity));
  } else {
    absl::MutexLock lock(&ucx_mu_);
    got = EnsureDataPlane();
    if (got.ok()) got = ucx_->Get(pin.offset(), dst, pin.size());
  }
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(30));
  UnpinRequest unpin;
  unpin.set_pin(pin.pin());
  UnpinReply ignored;
  grpc::Status unpinned = stub->Unpin(&context, unpin, &ignored);
  if (!got.ok()) return got;
  if (!unpinned.ok()) return FromGrpcStatus(unpinned);
  return pin.size();
}

absl::Status GrpcMemstoreClient::Move(const std::string& id, Tier tier) {
  grpc::ClientContext context;
  SetDeadline(&context, kCallTimeout);
  MoveTensorRequest request;
  request.set_tensor_id(id);
  request.set_tier(tier);
  MoveTensorReply reply;
  return FromGrpcStatus(Memstore::NewStub(channel_)->MoveTensor(&context, request, &reply));
}

absl::Status GrpcMemstoreClient::Free(const std::string& id) {
  grpc::ClientContext context;
  SetDeadline(&context, kCallTimeout);
  FreeTensorRequest request;
  request.set_tensor_id(id);
  FreeTensorReply reply;
  return FromGrpcStatus(Memstore::NewStub(channel_)->FreeTensor(&context, request, &reply));
}

absl::StatusOr<FreeTensorsReply> GrpcMemstoreClient::FreeTensors(const std::string& prefix,
                                                                  absl::Duration timeout) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  FreeTensorsRequest request;
  request.set_prefix(prefix);
  FreeTensorsReply reply;
  grpc::Status status = Memstore::NewStub(channel_)->FreeTensors(&context, request, &reply);
  if (!status.ok()) return FromGrpcStatus(status);
  return reply;
}

TierCapacity TierCapacityOf(const GetMemstoreStatsReply& stats) {
  TierCapacity c;
  for (const TierInfo& tier : stats.tiers()) {
    (tier.name() == "host" ? c.host_bytes : c.nvme_bytes) += tier.capacity_bytes();
  }
  return c;
}

absl::StatusOr<GetMemstoreStatsReply> FakeMemstoreClient::GetStats(absl::Duration) {
  absl::MutexLock lock(&mu_);
  GetMemstoreStatsReply reply;
  TierInfo* host = reply.add_tiers();
  TierInfo* nvme = reply.add_tiers();
  host->set_name("host");
  nvme->set_name("nvme:fake");
  for (const auto& [id, t] : tensors_) {
    TierInfo* tier = t.tier == TIER_HOST ? host : nvme;
    tier->set_used_bytes(tier->used_bytes() + t.bytes.size());
  }
  reply.set_tensors(static_cast<int64_t>(tensors_.size()));
  return reply;
}

absl::Status FakeMemstoreClient::Write(const std::string& id, const void* data, int64_t size,
                                       const std::string& dtype, Tier tier) {
  if (size <= 0) return absl::InvalidArgumentError(absl::StrCat("tensor ", id, ": size ", size));
  absl::MutexLock lock(&mu_);
  tensors_[id] = Tensor{std::string(static_cast<const char*>(data), size), tier};
  return absl::OkStatus();
}

absl::StatusOr<int64_t> FakeMemstoreClient::Read(const std::string& id, void* dst,
                                                 int64_t capacity) {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(id);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", id));
  const int64_t size = static_cast<int64_t>(it->second.bytes.size());
  if (size > capacity) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", id, " has ", size,
                                                   " bytes; the buffer holds ", capacity));
  }
  memcpy(dst, it->second.bytes.data(), size);
  return size;
}

absl::Status FakeMemstoreClient::Move(const std::string& id, Tier tier) {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(id);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", id));
  it->second.tier = tier;
  return absl::OkStatus();
}

absl::Status FakeMemstoreClient::Free(const std::string& id) {
  absl::MutexLock lock(&mu_);
  if (tensors_.erase(id) == 0) return absl::NotFoundError(absl::StrCat("no tensor ", id));
  return absl::OkStatus();
}

absl::StatusOr<FreeTensorsReply> FakeMemstoreClient::FreeTensors(const std::string& prefix,
                                                                  absl::Duration) {
  if (prefix.empty()) return absl::InvalidArgumentError("FreeTensors needs a non-empty prefix");
  absl::MutexLock lock(&mu_);
  FreeTensorsReply reply;
  for (auto it = tensors_.lower_bound(prefix);
       it != tensors_.end() && it->first.compare(0, prefix.size(), prefix) == 0;) {
    reply.set_tensors(reply.tensors() + 1);
    reply.set_bytes(reply.bytes() + static_cast<int64_t>(it->second.bytes.size()));
    it = tensors_.erase(it);
  }
  return reply;
}

}  // namespace lumen
