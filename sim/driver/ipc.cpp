// CUDA IPC and peer access between simulated devices (issue 20). Device memory is one shared memory file per
// device and process (memory.cpp), so an IPC handle only has to say where the pages are: the exporter's pid,
// the file's descriptor number there, and the allocation's place in the file. The opener maps
// /proc/PID/fd/N (the same pages) into its own device's address space; both processes then read and write
// the same bytes, and the P2P ring's system-scope flags (kernels-ptx/emu/p2p_emu_sim.h) are real atomics on
// them.
//
// Peer access: every pair of distinct simulated devices can access each other (NVLink-like), unless
// NC_SIM_PEER=0, which says no everywhere (cuDeviceCanAccessPeer 0, cuCtxEnablePeerAccess and opening a
// handle exported on another device fail), to exercise nc's fallbacks. Processes on the same device
// ordinal always share (IPC on one GPU works without peer access).
#include "state.h"
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <unistd.h>

namespace sim {

// The handle's bytes: a magic word, the exporter's pid, then where the allocation is in its file (as written
// by this same library: the layout only has to agree with itself).
struct HandleBytes {
    char magic[8];  // "ncsimipc"
    int32_t pid;
    IpcExport where;  // `fd` is the exporter's descriptor number, to be opened through /proc/PID/fd
};
static_assert(sizeof(HandleBytes) <= sizeof(CUipcMemHandle), "the handle must fit CUDA's 64 bytes");
static const char kMagic[8] = {'n', 'c', 's', 'i', 'm', 'i', 'p', 'c'};

static int g_peer = -1;  // NC_SIM_PEER: 1 (default) or 0
static std::mutex g_peer_lock;
static std::set<std::pair<SimContext*, SimContext*>> g_peer_enabled;

bool ipc_init() {
    const char* v = std::getenv("NC_SIM_PEER");
    if (!v || !*v || std::strcmp(v, "1") == 0) {
        g_peer = 1;
    } else if (std::strcmp(v, "0") == 0) {
        g_peer = 0;
    } else {
        say("NC_SIM_PEER='%s': set it to 0 (no peer access between simulated devices) or 1 / unset (peers can "
            "access each other)", v);
        return false;
    }
    return true;
}

static bool peers_allowed() { return g_peer != 0; }

}  // namespace sim

using namespace sim;

SIM_API CUresult cuDeviceCanAccessPeer(int* can, CUdevice d, CUdevice peer) {
    if (!can) return CUDA_ERROR_INVALID_VALUE;
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    for (CUdevice x : {d, peer})
        if (x < 0 || x >= config().devices)
            return fail(CUDA_ERROR_INVALID_DEVICE, "cuDeviceCanAccessPeer: device %d does not exist (NC_SIM_DEVICES=%d)",
                        x, config().devices);
    // A device is not its own peer (the driver answers 0 for the same device).
    *can = d != peer && peers_allowed() ? 1 : 0;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxEnablePeerAccess(CUcontext peer, unsigned flags) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuCtxEnablePeerAccess", &c)) return r;
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuCtxEnablePeerAccess: flags must be 0, got %u", flags);
    int pd = context_device(peer);
    if (!peer || primary_context(pd) != peer)
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxEnablePeerAccess: %p is not a context", (void*)peer);
    if (pd == context_device(c))
        return fail(CUDA_ERROR_INVALID_DEVICE, "cuCtxEnablePeerAccess: the peer context is on this context's device");
    if (!peers_allowed())
        return fail(CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, "cuCtxEnablePeerAccess: peer access is off (NC_SIM_PEER=0)");
    std::lock_guard<std::mutex> lock(g_peer_lock);
    if (!g_peer_enabled.insert({c, peer}).second) return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxDisablePeerAccess(CUcontext peer) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuCtxDisablePeerAccess", &c)) return r;
    std::lock_guard<std::mutex> lock(g_peer_lock);
    if (g_peer_enabled.erase({c, peer}) == 0) return CUDA_ERROR_PEER_ACCESS_NOT_ENABLED;
    return CUDA_SUCCESS;
}

// The driver takes the base of an allocation from cuMemAlloc (not a pool's, not one opened from a peer).
SIM_API CUresult cuIpcGetMemHandle(CUipcMemHandle* handle, CUdeviceptr ptr) {
    if (!handle) return CUDA_ERROR_INVALID_VALUE;
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuIpcGetMemHandle", &c)) return r;
    IpcExport e;
    if (!export_allocation(ptr, e))
        return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcGetMemHandle(0x%llx): not the start of a live allocation of this "
                    "process (cuMemAlloc's pointer)", (unsigned long long)ptr);
    // The handle is a message to other processes, which are ordered after nothing this one queued: bytes
    // still being written when it goes out may be read stale (the P2P ring's flags, zeroed by a cuMemsetD8
    // that returns before it runs). Race mode reports it, as it reports a missing event between streams.
    std::string pending;
    if (config().race && host_unwaited_write(ptr, e.size, pending))
        fault("RACE on device memory: cuIpcGetMemHandle(0x%llx) exports a %llu-byte allocation that %s writes, and "
              "the host has not waited for that write (no synchronization since it was queued): a process that "
              "opens the handle may read the bytes before they land; synchronize before exporting",
              (unsigned long long)ptr, (unsigned long long)e.size, pending.c_str());
    HandleBytes h;
    std::memset(static_cast<void*>(&h), 0, sizeof h);  // padding included: the handle's bytes are all defined
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.pid = int32_t(getpid());
    h.where = e;
    std::memset(handle->reserved, 0, sizeof handle->reserved);
    std::memcpy(handle->reserved, &h, sizeof h);
    trace("ipc-export", std::to_string(e.size), e.size);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr* out, CUipcMemHandle handle, unsigned flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuIpcOpenMemHandle", &c)) return r;
    // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS (1) is the only flag, and the driver requires it.
    if (flags != 1)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcOpenMemHandle: flags must be CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS "
                    "(1), got %u", flags);
    HandleBytes h;
    std::memcpy(&h, handle.reserved, sizeof h);
    const IpcExport& e = h.where;
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0 || e.pages_bytes == 0 || e.size > e.pages_bytes)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcOpenMemHandle: not a handle from this simulator's "
                    "cuIpcGetMemHandle");
    if (h.pid == int32_t(getpid()))
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuIpcOpenMemHandle: the handle was exported by this process (the "
                    "driver opens only other processes' handles)");
    int me = context_device(c);
    if (e.device != me && !peers_allowed())
        return fail(CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, "cuIpcOpenMemHandle: the memory is on device %d, this context "
                    "on device %d, and peer access is off (NC_SIM_PEER=0)", e.device, me);
    std::string path = "/proc/" + std::to_string(h.pid) + "/fd/" + std::to_string(e.fd);
    int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuIpcOpenMemHandle: opening %s failed (%s): has process %d, which "
                    "exported the handle, ended?", path.c_str(), strerror(errno), h.pid);
    uint64_t at = 0;
    CUresult r = import_mapping(me, fd, e, at);
    close(fd);  // the mapping keeps the file
    if (r == CUDA_SUCCESS) *out = at;
    if (r == CUDA_SUCCESS) trace("ipc-open", std::to_string(e.size), e.size);
    return r;
}

SIM_API CUresult cuIpcCloseMemHandle(CUdeviceptr ptr) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuIpcCloseMemHandle", &c)) return r;
    // As cuMemFree: work still queued that may use the mapping runs first.
    host_wait_context(c, "cuIpcCloseMemHandle");
    Allocation a;
    if (find_allocation(ptr, a) && a.live && a.start == ptr) race_forget(a.start, a.size);
    return close_import(ptr);
}
