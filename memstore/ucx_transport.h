// The memstore's UCX data plane: a UcxServer exposes an existing host region (the memstore
// arena) for one-sided remote reads and writes, and a UcxClient in another process (a worker)
// reads and writes byte ranges of it. On one node the client copies through a direct pointer
// into the region when the transport offers one (ucp_rkey_ptr), else it uses RMA get/put.
// Thread-safety is stated per class below.
#ifndef LUMEN_MEMSTORE_UCX_TRANSPORT_H_
#define LUMEN_MEMSTORE_UCX_TRANSPORT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Opaque UCX handles (from <ucp/api/ucp_def.h>), so users of this header need no UCX headers.
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_worker* ucp_worker_h;
typedef struct ucp_mem* ucp_mem_h;
typedef struct ucp_ep* ucp_ep_h;
typedef struct ucp_rkey* ucp_rkey_h;
typedef struct ucp_address ucp_address_t;

namespace lumen {

// What a client needs to reach a served region. The strings are opaque byte blobs (they travel
// in proto `bytes` fields); the blobs are only meaningful to a UCX of the same version.
struct UcxEndpointInfo {
  std::string worker_address;  // ucp_worker_get_address of the server's worker.
  std::string rkey;            // ucp_rkey_pack of the region.
  uint64_t base_address = 0;   // The region's virtual address in the server process.
  uint64_t length = 0;         // The region's length in bytes.
};

// Serves one existing memory region (which it does not own and which must outlive it) for
// remote get/put, and runs a progress thread so transports that need target-side progress
// (TCP) work. Nothing here counts bytes: the clients' operations are one-sided and invisible to
// the server on shared-memory transports, so bytes are counted by UcxClient.
// Thread-safe: info() may be called from any thread; the progress thread is internal.
class UcxServer {
 public:
  // Initialises UCX (transports from the environment, e.g. UCX_TLS; the default works for
  // processes on one node), registers [region, region + length) and starts the progress
  // thread. INVALID_ARGUMENT for a null or empty region; INTERNAL naming the UCX call otherwise.
  static absl::StatusOr<std::unique_ptr<UcxServer>> Create(void* region, size_t length);

  // Like Create, but UCX allocates the `length`-byte region itself (ucp_mem_map with
  // UCP_MEM_MAP_FLAG_ALLOCATE: shared memory from its sysv/posix transports), which the server
  // owns; region() gives its address. Such a region can be mapped by clients on the same node,
  // so they get a direct pointer (ucp_rkey_ptr) and copy at memory speed; UCX 1.13 cannot give
  // one for a region it did not allocate (that needs xpmem, absent here).
  static absl::StatusOr<std::unique_ptr<UcxServer>> CreateWithAllocatedRegion(size_t length);

  // Stops the progress thread, then unregisters the region and tears UCX down. Clients must
  // have stopped using the region; their later operations fail or read stale memory.
  ~UcxServer();

  UcxServer(const UcxServer&) = delete;
  UcxServer& operator=(const UcxServer&) = delete;

  // Constant after construction.
  const UcxEndpointInfo& info() const { return info_; }
  // The served region's address in this process.
  void* region() const { return reinterpret_cast<void*>(info_.base_address); }

 private:
  UcxServer() = default;
  // Shared by the factories: maps [region, region + length), or allocates `length` bytes when
  // `allocate` (then `region` is ignored).
  static absl::StatusOr<std::unique_ptr<UcxServer>> CreateMapped(void* region, size_t length,
                                                                 bool allocate);
  void ProgressLoop();

  // Constant after construction (set up by Create, torn down by the destructor).
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  int event_fd_ = -1;  // ucp_worker_get_efd; -1 when the worker has none (then it polls).
  int wake_fd_ = -1;   // eventfd written by the destructor to wake the progress thread.
  UcxEndpointInfo info_;

  std::atomic<bool> stop_{false};
  std::thread progress_thread_;  // The only thread that touches worker_ after Create.
};

struct UcxClientOptions {
  // Copy through a direct pointer into the server's region when the transport can give one
  // (ucp_rkey_ptr: shared-memory transports that map the region). This is the memory-speed
  // path; false forces RMA get/put through the UCX worker (slower on one node, but the only
  // path across nodes), which tests use to cover that path.
  bool use_direct_pointer = true;
};

// A connection from this process to one UcxServer's region, addressed by offsets into it.
// Thread-compatible, not thread-safe: use one client per thread (each has its own UCX worker),
// or serialise calls externally. The counters may be read from any thread.
class UcxClient {
 public:
  // Initialises UCX and a worker for this client. INTERNAL naming the UCX call on failure.
  static absl::StatusOr<std::unique_ptr<UcxClient>> Create(UcxClientOptions options = {});

  // Closes the endpoint (flushing outstanding operations) and tears UCX down.
  ~UcxClient();

  UcxClient(const UcxClient&) = delete;
  UcxClient& operator=(const UcxClient&) = delete;

  // Connects to `remote` (as returned by UcxServer::info() in the serving process).
  // FAILED_PRECONDITION if already connected; INVALID_ARGUMENT for an empty address or rkey;
  // INTERNAL / UNAVAILABLE naming the UCX call otherwise. On error the client stays
  // unconnected.
  absl::Status Connect(const UcxEndpointInfo& remote);

  // Copies `length` bytes at `offset` of the remote region into `dst`. Returns when the bytes
  // are in `dst`. OUT_OF_RANGE (naming offset, length and region size) when the range leaves
  // the region; FAILED_PRECONDITION before Connect; INTERNAL naming the UCX call otherwise
  // (then `dst` holds unspecified bytes).
  absl::Status Get(uint64_t offset, void* dst, size_t length);

  // Copies `length` bytes from `src` to `offset` of the remote region. Returns when the bytes
  // are visible in the remote region (the put is flushed). Errors as for Get; on error the
  // remote range holds unspecified bytes.
  absl::Status Put(const void* src, uint64_t offset, size_t length);

  // True when Get/Put copy through a direct pointer (valid after a successful Connect).
  bool has_direct_pointer() const { return direct_ != nullptr; }

  // The transports UCX chose for the endpoint (ucp_ep_print_info), for logs and benchmarks.
  // Empty before Connect.
  std::string TransportDescription() const;

  uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  uint64_t bytes_written() const { return bytes_written_.load(std::memory_order_relaxed); }

 private:
  explicit UcxClient(UcxClientOptions options) : options_(options) {}
  absl::Status CheckRange(const char* op, uint64_t offset, size_t length) const;
  // Drives the worker until `request` (from a *_nbx call) completes; frees it.
  absl::Status Wait(const char* op, void* request);

  // Constant after construction.
  const UcxClientOptions options_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;

  // Set by Connect.
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  uint8_t* direct_ = nullptr;  // The remote region's base in this process, or null.
  UcxEndpointInfo remote_;

  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> bytes_written_{0};
};

}  // namespace lumen

#endif  // LUMEN_MEMSTORE_UCX_TRANSPORT_H_
