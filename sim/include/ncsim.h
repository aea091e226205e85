// The private contract between the simulated CUDA driver (libcuda.so.1, sim/driver/) and the other
// stand-ins (libcublas.so.13 / libcublasLt.so.13 in sim/blas/, later libnccl.so): they find these functions
// in the already-loaded driver with dlsym(RTLD_DEFAULT, ...) when they are first used, so they share its
// device memory map, its streams and its checks. Nothing in nc calls these; the engine only sees the
// documented CUDA entry points.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {

// Checks that [ptr, ptr + bytes) lies inside one live device allocation of the current context's device.
// `what` names the caller (e.g. "cublasLtMatmul A"). On a violation the driver prints the call, the address,
// the nearest allocation and its size on stderr and ends the process (as compute-sanitizer stops a run).
// Returns 0 when the range is valid.
int ncsim_check_range(const void* ptr, size_t bytes, int is_write, const char* what);

// Queues fn(ctx) on `stream` (a CUstream; 0 = the legacy default stream) after everything queued there
// before, as a kernel would be: it runs on the stream's worker thread, in order, asynchronously to the
// caller. `what` names the work for traces and error messages. The accesses are declared first with
// ncsim_declare_access (for the race checker and the trace); fn must not touch other device memory.
// Returns 0 (CUDA_SUCCESS) or a CUresult the caller passes on (e.g. an invalid stream).
int ncsim_enqueue(void* stream, void (*fn)(void* ctx), void* ctx, const char* what);

// Declares, for the next ncsim_enqueue on this thread, that the work reads (is_write = 0) or writes
// (is_write = 1) [ptr, ptr + bytes). Used by the race checker (NC_SIM_RACE=1) and the bounds check.
void ncsim_declare_access(const void* ptr, size_t bytes, int is_write);

// Adds one line to the step trace (NC_SIM_TRACE): kind is "gemm", "launch", "h2d", "d2h", "sync", "alloc"...,
// detail a short description such as the GEMM shape "bf16 m=256 n=768 k=256 batch=1".
void ncsim_trace(const char* kind, const char* detail);

// The simulated device's ordinal that the calling thread's current context belongs to, or -1 when none.
int ncsim_current_device(void);

}  // extern "C"
