#include "memstore/ucx_transport.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <ucp/api/ucp.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace lumen {
namespace {

// How long the progress thread sleeps in poll() before rechecking the stop flag when no event
// arrives. The destructor also writes wake_fd_, so this only bounds a lost wakeup.
constexpr int kPollTimeoutMs = 100;
// How long a client destructor waits for the endpoint close to complete.
constexpr auto kCloseTimeout = std::chrono::seconds(2);

absl::Status UcsError(const char* op, ucs_status_t status) {
  const std::string message = absl::StrCat(op, ": ", ucs_status_string(status), " (", status, ")");
  switch (status) {
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_TIMED_OUT:
      return absl::UnavailableError(message);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_NO_RESOURCE:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status UcsCheck(const char* op, ucs_status_t status) {
  if (status == UCS_OK) return absl::OkStatus();
  return UcsError(op, status);
}

// ucp_init with `features`; transports and other settings come from the UCX_* environment.
absl::StatusOr<ucp_context_h> InitContext(uint64_t features) {
  ucp_config_t* config = nullptr;
  RETURN_IF_ERROR(UcsCheck("ucp_config_read", ucp_config_read(nullptr, nullptr, &config)));
  ucp_params_t params = {};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = features;
  ucp_context_h context = nullptr;
  const ucs_status_t status = ucp_init(&params, config, &context);
  ucp_config_release(config);
  RETURN_IF_ERROR(UcsCheck("ucp_init", status));
  return context;
}

absl::StatusOr<ucp_worker_h> CreateWorker(ucp_context_h context) {
  ucp_worker_params_t params = {};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // Each worker is driven by one thread at a time (see the class comments).
  params.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  RETURN_IF_ERROR(UcsCheck("ucp_worker_create", ucp_worker_create(context, &params, &worker)));
  return worker;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// UcxServer

absl::StatusOr<std::unique_ptr<UcxServer>> UcxServer::Create(void* region, size_t length) {
  if (region == nullptr || length == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "UcxServer needs a non-empty region, got address ", reinterpret_cast<uintptr_t>(region),
        " length ", length));
  }
  return CreateMapped(region, length, /*allocate=*/false);
}

absl::StatusOr<std::unique_ptr<UcxServer>> UcxServer::CreateWithAllocatedRegion(size_t length) {
  if (length == 0) {
    return absl::InvalidArgumentError("UcxServer needs a non-empty region, got length 0");
  }
  return CreateMapped(nullptr, length, /*allocate=*/true);
}

absl::StatusOr<std::unique_ptr<UcxServer>> UcxServer::CreateMapped(void* region, size_t length,
                                                                   bool allocate) {
  std::unique_ptr<UcxServer> server(new UcxServer());
  // WAKEUP lets the progress thread sleep on the worker's event fd instead of spinning.
  ASSIGN_OR_RETURN(server->context_, InitContext(UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP));
  ASSIGN_OR_RETURN(server->worker_, CreateWorker(server->context_));

  ucp_mem_map_params_t map = {};
  map.field_mask = UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  map.length = length;
  if (allocate) {
    map.field_mask |= UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    map.flags = UCP_MEM_MAP_ALLOCATE;
  } else {
    map.field_mask |= UCP_MEM_MAP_PARAM_FIELD_ADDRESS;
    map.address = region;
  }
  ucs_status_t status = ucp_mem_map(server->context_, &map, &server->memh_);
  if (status != UCS_OK) {
    server->memh_ = nullptr;
    return UcsError(absl::StrCat("ucp_mem_map of ", length, " bytes",
                                 allocate ? " (allocate)" : "")
                        .c_str(),
                    status);
  }
  if (allocate) {
    ucp_mem_attr_t attr = {};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    RETURN_IF_ERROR(UcsCheck("ucp_mem_query", ucp_mem_query(server->memh_, &attr)));
    region = attr.address;
    // UCX may round the allocation up; serve exactly what was asked for.
    if (attr.length < length) {
      return absl::InternalError(absl::StrCat("ucp_mem_map allocated ", attr.length,
                                              " bytes, fewer than the ", length, " asked for"));
    }
  }

  void* rkey_buffer = nullptr;
  size_t rkey_size = 0;
  RETURN_IF_ERROR(UcsCheck(
      "ucp_rkey_pack", ucp_rkey_pack(server->context_, server->memh_, &rkey_buffer, &rkey_size)));
  server->info_.rkey.assign(static_cast<const char*>(rkey_buffer), rkey_size);
  ucp_rkey_buffer_release(rkey_buffer);

  ucp_address_t* address = nullptr;
  size_t address_size = 0;
  RETURN_IF_ERROR(UcsCheck("ucp_worker_get_address",
                           ucp_worker_get_address(server->worker_, &address, &address_size)));
  server->info_.worker_address.assign(reinterpret_cast<const char*>(address), address_size);
  ucp_worker_release_address(server->worker_, address);
  server->info_.base_address = reinterpret_cast<uintptr_t>(region);
  server->info_.length = length;

  status = ucp_worker_get_efd(server->worker_, &server->event_fd_);
  if (status != UCS_OK) {
    // Still correct without it: the progress thread then polls with a short sleep.
    LOG(WARNING) << "ucp_worker_get_efd: " << ucs_status_string(status)
                 << "; the UCX progress thread will poll";
    server->event_fd_ = -1;
  }
  server->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (server->wake_fd_ < 0) {
    return absl::InternalError(absl::StrCat("eventfd for the UCX progress thread: ",
                                            strerror(errno)));
  }
  server->progress_thread_ = std::thread([s = server.get()] { s->ProgressLoop(); });
  return server;
}

void UcxServer::ProgressLoop() {
  while (!stop_.load(std::memory_order_acquire)) {
    while (ucp_worker_progress(worker_) != 0) {
    }
    if (event_fd_ >= 0) {
      const ucs_status_t status = ucp_worker_arm(worker_);
      if (status == UCS_ERR_BUSY) continue;  // Events arrived meanwhile: progress again.
      if (status != UCS_OK) {
        LOG(ERROR) << "ucp_worker_arm: " << ucs_status_string(status) << "; polling instead";
        event_fd_ = -1;
        continue;
      }
      pollfd fds[2] = {{event_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      poll(fds, 2, kPollTimeoutMs);
    } else {
      pollfd fds[1] = {{wake_fd_, POLLIN, 0}};
      poll(fds, 1, 1);
    }
  }
}

UcxServer::~UcxServer() {
  if (progress_thread_.joinable()) {
    stop_.store(true, std::memory_order_release);
    const uint64_t one = 1;
    if (write(wake_fd_, &one, sizeof(one)) != sizeof(one)) {
      // The poll timeout bounds the wait anyway.
    }
    progress_thread_.join();
  }
  if (wake_fd_ >= 0) close(wake_fd_);
  if (memh_ != nullptr) {
    const ucs_status_t status = ucp_mem_unmap(context_, memh_);
    if (status != UCS_OK) LOG(ERROR) << "ucp_mem_unmap: " << ucs_status_string(status);
  }
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
}

// ---------------------------------------------------------------------------------------------
// UcxClient

absl::StatusOr<std::unique_ptr<UcxClient>> UcxClient::Create(UcxClientOptions options) {
  std::unique_ptr<UcxClient> client(new UcxClient(options));
  ASSIGN_OR_RETURN(client->context_, InitContext(UCP_FEATURE_RMA));
  ASSIGN_OR_RETURN(client->worker_, CreateWorker(client->context_));
  return client;
}

UcxClient::~UcxClient() {
  if (rkey_ != nullptr) ucp_rkey_destroy(rkey_);
  if (ep_ != nullptr) {
    ucp_request_param_t param = {};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = 0;  // Flush mode: outstanding operations complete first.
    void* request = ucp_ep_close_nbx(ep_, &param);
    if (UCS_PTR_IS_PTR(request)) {
      const auto deadline = std::chrono::steady_clock::now() + kCloseTimeout;
      while (ucp_request_check_status(request) == UCS_INPROGRESS &&
             std::chrono::steady_clock::now() < deadline) {
        ucp_worker_progress(worker_);
      }
      if (ucp_request_check_status(request) == UCS_INPROGRESS) {
        LOG(WARNING) << "ucp_ep_close_nbx did not complete within "
                     << std::chrono::seconds(kCloseTimeout).count() << " s; abandoning it";
      }
      ucp_request_free(request);
    } else if (UCS_PTR_IS_ERR(request)) {
      LOG(WARNING) << "ucp_ep_close_nbx: " << ucs_status_string(UCS_PTR_STATUS(request));
    }
  }
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
}

absl::Status UcxClient::Connect(const UcxEndpointInfo& remote) {
  if (ep_ != nullptr) {
    return absl::FailedPreconditionError("UcxClient::Connect: already connected");
  }
  if (remote.worker_address.empty() || remote.rkey.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("UcxClient::Connect: worker address (", remote.worker_address.size(),
                     " bytes) and rkey (", remote.rkey.size(), " bytes) must be non-empty"));
  }
  ucp_ep_params_t params = {};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
  params.address = reinterpret_cast<const ucp_address_t*>(remote.worker_address.data());
  ucp_ep_h ep = nullptr;
  RETURN_IF_ERROR(UcsCheck("ucp_ep_create", ucp_ep_create(worker_, &params, &ep)));

  ucp_rkey_h rkey = nullptr;
  const ucs_status_t status = ucp_ep_rkey_unpack(ep, remote.rkey.data(), &rkey);
  if (status != UCS_OK) {
    ucp_request_param_t close = {};
    close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    close.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* request = ucp_ep_close_nbx(ep, &close);
    if (UCS_PTR_IS_PTR(request)) {
      while (ucp_request_check_status(request) == UCS_INPROGRESS) ucp_worker_progress(worker_);
      ucp_request_free(request);
    }
    return UcsError("ucp_ep_rkey_unpack", status);
  }
  ep_ = ep;
  rkey_ = rkey;
  remote_ = remote;

  if (options_.use_direct_pointer) {
    void* ptr = nullptr;
    const ucs_status_t ptr_status = ucp_rkey_ptr(rkey_, remote.base_address, &ptr);
    if (ptr_status == UCS_OK) {
      direct_ = static_cast<uint8_t*>(ptr);
    } else {
      VLOG(1) << "ucp_rkey_ptr: " << ucs_status_string(ptr_status) << "; using RMA get/put";
    }
  }
  return absl::OkStatus();
}

std::string UcxClient::TransportDescription() const {
  if (ep_ == nullptr) return "";
  char* buffer = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&buffer, &size);
  if (stream == nullptr) return "";
  ucp_ep_print_info(ep_, stream);
  fclose(stream);
  std::string text(buffer, size);
  free(buffer);
  return text;
}

absl::Status UcxClient::CheckRange(const char* op, uint64_t offset, size_t length) const {
  if (ep_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("UcxClient::", op, " before Connect"));
  }
  if (offset > remote_.length || length > remote_.length - offset) {
    return absl::OutOfRangeError(absl::StrCat("UcxClient::", op, " of ", length,
                                              " bytes at offset ", offset,
                                              " leaves the remote region of ", remote_.length,
                                              " bytes"));
  }
  return absl::OkStatus();
}

absl::Status UcxClient::Wait(const char* op, void* request) {
  if (request == nullptr) return absl::OkStatus();  // Completed in place.
  if (UCS_PTR_IS_ERR(request)) return UcsError(op, UCS_PTR_STATUS(request));
  ucs_status_t status;
  while ((status = ucp_request_check_status(request)) == UCS_INPROGRESS) {
    ucp_worker_progress(worker_);
  }
  ucp_request_free(request);
  return UcsCheck(op, status);
}

absl::Status UcxClient::Get(uint64_t offset, void* dst, size_t length) {
  RETURN_IF_ERROR(CheckRange("Get", offset, length));
  if (length == 0) return absl::OkStatus();
  if (direct_ != nullptr) {
    memcpy(dst, direct_ + offset, length);
  } else {
    ucp_request_param_t param = {};
    void* request = ucp_get_nbx(ep_, dst, length, remote_.base_address + offset, rkey_, &param);
    RETURN_IF_ERROR(Wait("ucp_get_nbx", request));
  }
  bytes_read_.fetch_add(length, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status UcxClient::Put(const void* src, uint64_t offset, size_t length) {
  RETURN_IF_ERROR(CheckRange("Put", offset, length));
  if (length == 0) return absl::OkStatus();
  if (direct_ != nullptr) {
    memcpy(direct_ + offset, src, length);
    // Stores through the mapping are visible to the server once they retire; the fence orders
    // them before whatever the caller does next to announce the write (e.g. a gRPC call).
    std::atomic_thread_fence(std::memory_order_release);
  } else {
    ucp_request_param_t param = {};
    void* request = ucp_put_nbx(ep_, src, length, remote_.base_address + offset, rkey_, &param);
    RETURN_IF_ERROR(Wait("ucp_put_nbx", request));
    // put_nbx completion only means `src` may be reused; the flush makes it remotely visible.
    RETURN_IF_ERROR(Wait("ucp_ep_flush_nbx", ucp_ep_flush_nbx(ep_, &param)));
  }
  bytes_written_.fetch_add(length, std::memory_order_relaxed);
  return absl::OkStatus();
}

}  // namespace lumen
