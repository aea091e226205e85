// How the simulated cuBLAS / cuBLASLt reach the simulated device: the ncsim_* functions of the already-loaded
// simulated driver (sim/include/ncsim_client.h), and `submit`,
// which checks, declares, traces and queues one GEMM on a stream, as a kernel launch would be queued.
// Header-only: each library compiles its own copy.
#pragma once
#include <dlfcn.h>

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <unordered_set>

#include "blas_api.h"
#include "gemm.h"
#include "ncsim_client.h"

namespace {

// One line on stderr naming the library, the call and what is wrong (every refusal prints one).
__attribute__((format(printf, 3, 4))) int refuse(int status, const char* call, const char* fmt, ...) {
    static const char* names[] = {"SUCCESS", "NOT_INITIALIZED", "?", "ALLOC_FAILED", "?", "?", "?",
                                  "INVALID_VALUE", "ARCH_MISMATCH", "?", "?", "MAPPING_ERROR", "?",
                                  "EXECUTION_FAILED", "INTERNAL_ERROR", "NOT_SUPPORTED"};
    char what[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(what, sizeof what, fmt, args);
    va_end(args);
    const char* name = status >= 0 && status <= 15 ? names[status] : "?";
    fprintf(stderr, "nc simulated cuBLAS: %s: %s (CUBLAS_STATUS_%s)\n", call, what, name);
    return status;
}

// A handle is made and destroyed in one device's context: its resources (workspace, streams, events) live on that
// device, so cublasDestroy / cublasLtDestroy must run while the handle's context is current, or the real library
// releases them in another device's context. The stand-ins refuse such a destroy with one line, as a check:
// `made_on` is the device current at create (-1: none was, and the real library would use device 0's).
int destroy_in_wrong_context(const char* call, const void* handle, int made_on, int now) {
    int expected = made_on < 0 ? 0 : made_on;
    if (now == expected) return 0;
    return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "handle %p was created in device %d's context, but the calling "
                  "thread's current context is %s%d's: bind the handle's context before destroying it (a check of "
                  "the simulated library; the real one would release the handle's resources in the wrong context)",
                  handle, expected, now < 0 ? "no device's, not device " : "device ", now);
}

// The driver's functions (sim/include/ncsim_client.h), or null with one stderr line when the loaded
// libcuda.so.1 is not the simulated one: these libraries only run on the simulated device.
const Ncsim* ncsim(const char* call) {
    const Ncsim* functions = ncsim_functions();
    if (!functions)
        refuse(CUBLAS_STATUS_NOT_INITIALIZED, call,
               "the simulated cuBLAS needs the simulated driver (ncsim_* not found in the loaded libcuda.so.1); "
               "run through scripts/sim.sh, or put NVIDIA's cuBLAS on LD_LIBRARY_PATH for a real GPU");
    return functions;
}

// Live objects of one kind (a library's handles; cuBLASLt's descriptors, layouts and preferences), so a destroyed
// or made-up one is refused instead of read.
template <class T>
struct Registry {
    static constexpr int NOT_LIVE = -1;
    std::mutex mutex;
    std::unordered_set<T*> live;
    T* add(T* x) {
        std::lock_guard<std::mutex> lock(mutex);
        live.insert(x);
        return x;
    }
    T* find(const void* x) {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = live.find(static_cast<T*>(const_cast<void*>(x)));
        return it == live.end() ? nullptr : *it;
    }
    bool remove(const void* x) {
        std::lock_guard<std::mutex> lock(mutex);
        return live.erase(static_cast<T*>(const_cast<void*>(x))) == 1;
    }
    // Removes x when it is live and `check(x)` returns 0, under one lock, so that two destroys of one object
    // cannot both pass; NOT_LIVE when x is not live, else check's status.
    template <class Check>
    int remove_checked(const void* x, Check check) {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = live.find(static_cast<T*>(const_cast<void*>(x)));
        if (it == live.end()) return NOT_LIVE;
        if (int status = check(*it)) return status;
        live.erase(it);
        return 0;
    }
};

// A library handle (`H`: cuBLAS's or cuBLASLt's, with an `int device`) made in the current device's context.
template <class H, class Out>
int create_handle(const char* call, Registry<H>& handles, Out* out) {
    if (!out) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "handle is NULL");
    const Ncsim* sim = ncsim(call);
    if (!sim) return CUBLAS_STATUS_NOT_INITIALIZED;
    // No current context is no error: the real library's runtime would then use device 0's primary context.
    auto* h = new H();
    h->device = sim->current_device();
    handles.add(h);
    *out = reinterpret_cast<Out>(h);
    return CUBLAS_STATUS_SUCCESS;
}

// The live handle `handle` of `library` ("cuBLAS", "cuBLASLt"), or null with *status set after one line.
template <class H>
H* live_handle(Registry<H>& handles, const void* handle, const char* library, const char* call, int* status) {
    H* h = handles.find(handle);
    if (!h)
        *status = refuse(CUBLAS_STATUS_NOT_INITIALIZED, call, "handle %p is not a live %s handle", handle, library);
    return h;
}

// Destroys a live handle, in the context it was made in (destroy_in_wrong_context).
template <class H>
int destroy_handle(const char* call, Registry<H>& handles, const void* handle, const char* library) {
    int status = handles.remove_checked(handle, [&](H* h) {
        const Ncsim* sim = ncsim(call);
        return destroy_in_wrong_context(call, h, h->device, sim ? sim->current_device() : -1);
    });
    if (status == Registry<H>::NOT_LIVE)
        return refuse(CUBLAS_STATUS_NOT_INITIALIZED, call, "handle %p is not a live %s handle", handle, library);
    if (status) return status;
    delete static_cast<H*>(const_cast<void*>(handle));
    return CUBLAS_STATUS_SUCCESS;
}

// Bytes spanned by `batch` column-major matrices of rows x cols (rows, cols >= 1) with leading dimension ld
// and batch stride `stride` (elements), from the first byte of the first to the last byte of the last; 0
// when that is larger than any device memory (so the caller refuses it instead of overflowing).
size_t span_bytes(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride, Elem type) {
    unsigned __int128 elements = (unsigned __int128)(cols - 1) * (unsigned __int128)ld + (unsigned __int128)rows +
                                 (unsigned __int128)(batch - 1) * (unsigned __int128)stride;
    unsigned __int128 bytes = elements * elem_bytes(type);
    if (bytes > ((unsigned __int128)1 << 48)) return 0;
    return size_t(bytes);
}

// One device range a GEMM touches: checked against the live allocations (the driver ends the run on a
// violation, as compute-sanitizer would), then declared for the race checker.
struct Access {
    const void* ptr;
    size_t bytes;
    int is_write;
    const char* what;  // e.g. "cublasLtMatmul A"
};

void run_and_free(void* ctx) {
    Gemm* g = static_cast<Gemm*>(ctx);
    run_gemm(*g);
    delete g;
}

// Checks the accesses, traces the GEMM, and queues it on `stream` (it runs later, on the stream's worker).
// `call` names the entry point (a string literal: the driver may keep it for its messages).
int submit(const Ncsim& sim, const char* call, const Gemm& g, const Access* accesses, int count, void* stream) {
    for (int i = 0; i < count; i++) {
        if (sim.check_range(accesses[i].ptr, accesses[i].bytes, accesses[i].is_write, accesses[i].what) != 0)
            return refuse(CUBLAS_STATUS_EXECUTION_FAILED, call, "%s: %zu bytes at %p are not device memory",
                          accesses[i].what, accesses[i].bytes, accesses[i].ptr);
    }
    char detail[160];
    snprintf(detail, sizeof detail, "%s m=%" PRId64 " n=%" PRId64 " k=%" PRId64 " batch=%" PRId64 " op=%c%c out=%s",
             g.tf32 ? "tf32" : elem_name(g.a.type), g.m, g.n, g.k, g.batch, g.a.trans ? 'T' : 'N',
             g.b.trans ? 'T' : 'N', elem_name(g.d_type));
    sim.trace("gemm", detail);
    for (int i = 0; i < count; i++) sim.declare_access(accesses[i].ptr, accesses[i].bytes, accesses[i].is_write);
    Gemm* work = new Gemm(g);
    int result = sim.enqueue(stream, run_and_free, work, call);
    if (result != 0) {
        delete work;
        return refuse(CUBLAS_STATUS_EXECUTION_FAILED, call, "the driver refused to queue the GEMM on stream %p (CUresult %d)",
                      stream, result);
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace
