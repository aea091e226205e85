// Copies and memsets. Every device range is checked against the live allocations first (a range that leaves its
// allocation stops the run with the call, the address and the nearest allocation). Host behaviour, as the
// driver documents it for each:
//   - cuMemcpyHtoD / DtoH / DtoD and cuMemsetD* (no Async): queued on the legacy default stream, and the call
//     returns when done (a simplification: the driver may return before a device-side memset or DtoD ends);
//     in race mode a memset returns at once, as the driver allows ("asynchronous with respect to the host"
//     for device memory), so work that relies on it without a synchronization is reported (the P2P ring's
//     flags, zeroed before their IPC handles go out: ipc.cpp's export check, comm/src/p2p.rs);
//   - cuMemcpyHtoDAsync from pageable memory: the source is copied to a staging buffer before the call
//     returns, so the caller may reuse it at once; from pinned memory (cuMemAllocHost): read when the copy runs;
//   - cuMemcpyDtoHAsync into pageable memory: returns only once the copy is done (synchronous for the host);
//     into pinned memory: asynchronous, the data is there after a synchronization;
//   - DtoD and memsets (Async): queued, asynchronous.
#include "state.h"
#include <cstring>

namespace sim {

static std::string bytes_text(const char* what, size_t n) { return std::string(what) + " " + std::to_string(n) + " B"; }

static CUresult htod(const char* entry, CUdeviceptr dst, const void* src, size_t n, CUstream stream, bool sync) {
    SimContext* ctx = nullptr;
    if (CUresult r = need_context(entry, &ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (!src) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null host pointer", entry);
    check_range(dst, n, entry);
    std::function<void()> run;
    if (!sync && is_pinned_host(src, n)) {
        run = [dst, src, n] { std::memcpy(reinterpret_cast<void*>(dst), src, n); };
    } else {
        auto staged = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t*>(src),
                                                             static_cast<const uint8_t*>(src) + n);
        run = [dst, staged] { std::memcpy(reinterpret_cast<void*>(dst), staged->data(), staged->size()); };
    }
    SimStream* s = nullptr;
    if (CUresult r = enqueue(entry, stream, bytes_text(entry, n), run, {{dst, n, true}}, &s)) return r;
    trace("h2d", std::to_string(n), n);
    if (sync) return host_wait_stream(s, entry);
    return CUDA_SUCCESS;
}

static CUresult dtoh(const char* entry, void* dst, CUdeviceptr src, size_t n, CUstream stream, bool sync) {
    SimContext* ctx = nullptr;
    if (CUresult r = need_context(entry, &ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (!dst) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null host pointer", entry);
    check_range(src, n, entry);
    SimStream* s = nullptr;
    auto run = [dst, src, n] { std::memcpy(dst, reinterpret_cast<const void*>(src), n); };
    if (CUresult r = enqueue(entry, stream, bytes_text(entry, n), run, {{src, n, false}}, &s)) return r;
    trace("d2h", std::to_string(n), n);
    if (sync || !is_pinned_host(dst, n)) return host_wait_stream(s, sync ? entry : "cuMemcpyDtoHAsync into pageable memory");
    return CUDA_SUCCESS;
}

static CUresult dtod(const char* entry, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream stream, bool sync) {
    SimContext* ctx = nullptr;
    if (CUresult r = need_context(entry, &ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    check_range(src, n, entry);
    check_range(dst, n, entry);
    SimStream* s = nullptr;
    auto run = [dst, src, n] { std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n); };
    if (CUresult r = enqueue(entry, stream, bytes_text(entry, n), run, {{src, n, false}, {dst, n, true}}, &s))
        return r;
    trace("d2d", std::to_string(n), n);
    if (sync) return host_wait_stream(s, entry);
    return CUDA_SUCCESS;
}

// cuMemsetD8/16/32: `count` elements of `width` bytes, each set to `value`.
static CUresult memset_n(const char* entry, CUdeviceptr dst, unsigned value, size_t count, size_t width,
                         CUstream stream, bool sync) {
    SimContext* ctx = nullptr;
    if (CUresult r = need_context(entry, &ctx)) return r;
    if (dst % width != 0)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: destination 0x%llx is not %zu-byte aligned", entry,
                    (unsigned long long)dst, width);
    if (count == 0) return CUDA_SUCCESS;
    size_t n = count * width;
    check_range(dst, n, entry);
    auto run = [dst, value, count, width] {
        uint8_t* p = reinterpret_cast<uint8_t*>(dst);
        if (width == 1) {
            std::memset(p, int(value & 0xff), count);
        } else if (width == 2) {
            uint16_t v = uint16_t(value);
            for (size_t i = 0; i < count; i++) std::memcpy(p + 2 * i, &v, 2);
        } else {
            for (size_t i = 0; i < count; i++) std::memcpy(p + 4 * i, &value, 4);
        }
    };
    SimStream* s = nullptr;
    if (CUresult r = enqueue(entry, stream, bytes_text(entry, n), run, {{dst, n, true}}, &s)) return r;
    trace("memset", std::to_string(n), n);
    if (sync && !config().race) return host_wait_stream(s, entry);
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return htod("cuMemcpyHtoD", dst, src, n, nullptr, true);
}
SIM_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return htod("cuMemcpyHtoDAsync", dst, src, n, s, false);
}
SIM_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return dtoh("cuMemcpyDtoH", dst, src, n, nullptr, true);
}
SIM_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtoh("cuMemcpyDtoHAsync", dst, src, n, s, false);
}
SIM_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return dtod("cuMemcpyDtoD", dst, src, n, nullptr, true);
}
SIM_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtod("cuMemcpyDtoDAsync", dst, src, n, s, false);
}

// Unified addressing: the direction follows from which pointers are device memory.
static CUresult unified(const char* entry, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s, bool sync) {
    bool d_dev = is_device_pointer(dst), s_dev = is_device_pointer(src);
    if (d_dev && s_dev) return dtod(entry, dst, src, n, s, sync);
    if (d_dev) return htod(entry, dst, reinterpret_cast<const void*>(src), n, s, sync);
    if (s_dev) return dtoh(entry, reinterpret_cast<void*>(dst), src, n, s, sync);
    return unsupported(entry, "host-to-host copies (dst 0x%llx, src 0x%llx)", (unsigned long long)dst,
                       (unsigned long long)src);
}
SIM_API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return unified("cuMemcpy", dst, src, n, nullptr, true); }
SIM_API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return unified("cuMemcpyAsync", dst, src, n, s, false);
}

// Between devices: a device-to-device copy queued on the current context's stream (both memories are host
// memory here; peer access is not required for copies, as on the device).
SIM_API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t n, CUstream s) {
    return dtod("cuMemcpyPeerAsync", dst, src, n, s, false);
}
SIM_API CUresult cuMemcpyPeer(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t n) {
    return dtod("cuMemcpyPeer", dst, src, n, nullptr, true);
}

SIM_API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return memset_n("cuMemsetD8", d, v, n, 1, nullptr, true); }
SIM_API CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n) { return memset_n("cuMemsetD16", d, v, n, 2, nullptr, true); }
SIM_API CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) { return memset_n("cuMemsetD32", d, v, n, 4, nullptr, true); }
SIM_API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
    return memset_n("cuMemsetD8Async", d, v, n, 1, s, false);
}
SIM_API CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream s) {
    return memset_n("cuMemsetD16Async", d, v, n, 2, s, false);
}
SIM_API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream s) {
    return memset_n("cuMemsetD32Async", d, v, n, 4, s, false);
}
