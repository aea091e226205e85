// A stand-in for the simulated driver's ncsim_* functions (sim/include/ncsim.h), for testing the simulated
// cuBLAS / cuBLASLt without the driver: "device memory" is host memory from fake_alloc (filled with 0xFF
// bytes, NaN in f32 and bf16, as the driver poisons fresh allocations); ncsim_check_range checks a range lies
// in one live fake allocation (and, unlike the driver, returns 1 instead of ending the process, so a test can
// see it); ncsim_enqueue queues work per stream and runs nothing until fake_sync(), so a test sees whether a
// library call really returned before its GEMM ran. Built as libcuda.so.1 (with that soname), so the
// libraries find it as they find the simulated driver (sim/blas/device.h, ncsim_symbol).
#pragma once
#include <cstddef>

extern "C" {
// A stream the fake's ncsim_enqueue refuses (CUDA_ERROR_INVALID_HANDLE = 400), to test that path.
#define FAKE_BAD_STREAM ((void*)0xbad)

void* fake_alloc(size_t bytes);
void fake_free(void* ptr);
// Runs every queued piece of work in order; returns how many ran.
int fake_sync(void);
int fake_pending(void);
// Range violations reported by ncsim_check_range so far.
int fake_violations(void);
// The trace lines ncsim_trace received.
int fake_trace_count(void);
const char* fake_trace_line(int i);
// The accesses declared for, and the stream of, the most recent ncsim_enqueue.
int fake_last_access_count(void);
void fake_last_access(int i, const void** ptr, size_t* bytes, int* is_write);
void* fake_last_stream(void);
}
