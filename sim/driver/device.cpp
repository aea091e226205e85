// cuInit, devices (count, name, attributes, memory) and contexts (one primary context per device; the current
// context is per host thread, as in the driver). Device N is named "nc simulated GPU N (CPU)" and reports
// compute capability 9.0 and an H100's launch limits, NC_SIM_MEM of memory.
#include "state.h"
#include <cstdio>
#include <cstring>

struct SimContext {
    int device;
    int retained = 0;
};

namespace sim {

static std::once_flag g_init_once;
static CUresult g_init_result = CUDA_ERROR_NOT_INITIALIZED;
static std::vector<std::unique_ptr<SimContext>> g_contexts;
static thread_local SimContext* t_current = nullptr;

bool initialized() { return g_init_result == CUDA_SUCCESS; }

SimContext* primary_context(int device) {
    if (!initialized() || device < 0 || device >= int(g_contexts.size())) return nullptr;
    return g_contexts[size_t(device)].get();
}

SimContext* current_context() { return t_current; }

int context_device(SimContext* ctx) { return ctx ? ctx->device : -1; }

CUresult need_context(const char* entry, SimContext** out) {
    if (!initialized()) return fail(CUDA_ERROR_NOT_INITIALIZED, "%s: cuInit has not succeeded", entry);
    if (!t_current) return fail(CUDA_ERROR_INVALID_CONTEXT, "%s: no context is current on this thread", entry);
    if (CUresult r = sticky_error(t_current->device)) return r;  // a kernel faulted (inject.cpp)
    *out = t_current;
    return CUDA_SUCCESS;
}

static CUresult check_device(const char* entry, CUdevice d) {
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    if (d < 0 || d >= config().devices)
        return fail(CUDA_ERROR_INVALID_DEVICE, "%s: device %d does not exist (NC_SIM_DEVICES=%d)", entry, d,
                    config().devices);
    return CUDA_SUCCESS;
}

static bool is_context(CUcontext c) {
    for (auto& p : g_contexts)
        if (p.get() == c) return true;
    return false;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuInit(unsigned flags) {
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0, got %u", flags);
    std::call_once(g_init_once, [] {
        Config c;
        if (!load_config(c) || !ipc_init()) {
            g_init_result = CUDA_ERROR_INVALID_VALUE;
            return;
        }
        memory_init(c.devices, c.mem_bytes);
        for (int d = 0; d < c.devices; d++) g_contexts.push_back(std::make_unique<SimContext>(SimContext{d}));
        install_fault_handler();
        g_init_result = CUDA_SUCCESS;
    });
    return g_init_result;
}

SIM_API CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetCount(int* count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    *count = config().devices;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceGet", ordinal)) return r;
    *device = ordinal;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceGetName", d)) return r;
    std::snprintf(name, size_t(len), "nc simulated GPU %d (CPU)", d);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceTotalMem", d)) return r;
    *bytes = config().mem_bytes;
    return CUDA_SUCCESS;
}

// A UUID that says what it is: "ncsim" then the ordinal.
static void fill_uuid(char* bytes, CUdevice d) {
    std::memset(bytes, 0, 16);
    std::memcpy(bytes, "ncsim-device", 12);
    bytes[15] = char(d);
}
SIM_API CUresult cuDeviceGetUuid(char* uuid, CUdevice d) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceGetUuid", d)) return r;
    fill_uuid(uuid, d);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuDeviceGetUuid_v2(char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

SIM_API CUresult cuDeviceGetPCIBusId(char* id, int len, CUdevice d) {
    if (!id || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceGetPCIBusId", d)) return r;
    std::snprintf(id, size_t(len), "0000:%02x:00.0", 0x10 + d);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetByPCIBusId(CUdevice* d, const char* id) {
    if (!d || !id) return CUDA_ERROR_INVALID_VALUE;
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    unsigned domain = 0, bus = 0, dev = 0, fn = 0;
    if (std::sscanf(id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn) == 4 && bus >= 0x10 &&
        int(bus - 0x10) < config().devices && domain == 0 && dev == 0 && fn == 0) {
        *d = int(bus - 0x10);
        return CUDA_SUCCESS;
    }
    return fail(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGetByPCIBusId: no simulated device has bus id '%s'", id);
}

// cuDeviceCanAccessPeer and cuCtxEnablePeerAccess: ipc.cpp.

SIM_API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice d) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDeviceGetAttribute", d)) return r;
    int v;
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: v = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: v = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: v = int(kSharedPerBlock); break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: v = int(kSharedPerBlockOptin); break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: v = 228 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: v = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: v = 2619000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: v = 5120; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: v = 50 * 1024 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: v = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: v = 2048; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: v = 32; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: v = 0x10 + d; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: v = 0; break;
        // No memory pools: cudarc then allocates with cuMemAlloc and frees with cuMemFree.
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: v = 0; break;
        default:
            return unsupported("cuDeviceGetAttribute", "attribute %d is not simulated (device %d)", attribute, d);
    }
    *value = v;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDevicePrimaryCtxRetain", d)) return r;
    SimContext* c = primary_context(d);
    c->retained++;
    *ctx = c;
    return CUDA_SUCCESS;
}

// The primary context lives as long as the process (its streams and memory stay valid): releasing only counts.
SIM_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (CUresult r = check_device("cuDevicePrimaryCtxRelease", d)) return r;
    SimContext* c = primary_context(d);
    if (c->retained > 0) c->retained--;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
    if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_device("cuDevicePrimaryCtxGetState", d)) return r;
    *flags = 0;
    *active = primary_context(d)->retained > 0;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx && !is_context(ctx))
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: %p is not a context of this driver", (void*)ctx);
    t_current = ctx;
    return CUDA_SUCCESS;
}

// The context stack is one deep per thread (push replaces, pop clears): enough for callers that bracket a call.
SIM_API CUresult cuCtxPushCurrent_v2(CUcontext ctx) { return cuCtxSetCurrent(ctx); }
SIM_API CUresult cuCtxPopCurrent_v2(CUcontext* ctx) {
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx) *ctx = t_current;
    t_current = nullptr;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuCtxGetDevice", &c)) return r;
    *d = c->device;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxSynchronize() {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuCtxSynchronize", &c)) return r;
    return host_wait_context(c, "cuCtxSynchronize");
}

// Scheduling flags only change how the host waits; every wait here blocks on a condition variable.
SIM_API CUresult cuCtxSetFlags(unsigned flags) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuCtxSetFlags", &c)) return r;
    if (flags & ~7u) return unsupported("cuCtxSetFlags", "flags 0x%x (only scheduling flags 0-7 are simulated)", flags);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetApiVersion(CUcontext, unsigned* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

// There is no profiler to start; the entry points succeed, as they do on a GPU when none is attached, and
// mark the trace (NC_SIM_TRACE): `nc-train --profile-steps A:B` calls them around steps A..B, so
// scripts/sim_trace_summary.sh can count exactly what those steps asked of the device.
SIM_API CUresult cuProfilerStart() {
    trace("profiler", "start");
    return CUDA_SUCCESS;
}
SIM_API CUresult cuProfilerStop() {
    trace("profiler", "stop");
    return CUDA_SUCCESS;
}
