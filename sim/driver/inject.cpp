// Fault injection (issue 20): the failures a real device has and a test cannot otherwise provoke, off unless the
// environment asks for them (config.cpp parses it):
//   - NC_SIM_FAIL_ALLOC=N[@D]: the N-th cuMemAlloc (counting from 1) on device D, or on any device of this
//     process when @D is absent, and every later one fail with CUDA_ERROR_OUT_OF_MEMORY, as when the device is
//     full (an allocator that frees its cache and retries still fails);
//   - NC_SIM_FAULT_KERNEL=NAME:N[@D]: the N-th launch of kernel NAME on device D (any device without @D) faults
//     when it runs, as a kernel touching an illegal address does on hardware: the launch itself returns success
//     (launches are asynchronous), the kernel does not run, and from then on the device's context is broken:
//     every later call that uses it returns CUDA_ERROR_ILLEGAL_ADDRESS (a sticky error), synchronizations
//     included, and nothing queued after the fault runs.
// In a multi-process run each rank loads its own driver and uses its own device, so @D picks the rank.
#include "state.h"

namespace sim {

static std::atomic<uint64_t> g_allocations{0};     // cuMemAlloc calls counted for NC_SIM_FAIL_ALLOC
static std::atomic<uint64_t> g_kernel_launches{0};  // launches of NC_SIM_FAULT_KERNEL's kernel
static std::atomic<int> g_sticky[kMaxDevices];      // per device: CUDA_SUCCESS or the sticky error

static bool on_device(int wanted, int device) { return wanted < 0 || wanted == device; }

CUresult inject_alloc_failure(int device, size_t bytes) {
    const Config& c = config();
    if (c.fail_alloc_at == 0 || !on_device(c.fail_alloc_device, device)) return CUDA_SUCCESS;
    uint64_t n = ++g_allocations;
    if (n < c.fail_alloc_at) return CUDA_SUCCESS;
    if (n == c.fail_alloc_at)
        say("cuMemAlloc of %zu bytes on device %d: out of memory, injected (NC_SIM_FAIL_ALLOC: allocation %llu; every "
            "later one fails too)", bytes, device, (unsigned long long)n);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

uint64_t inject_kernel_fault(const std::string& kernel, int device) {
    const Config& c = config();
    if (c.fault_kernel_at == 0 || kernel != c.fault_kernel || !on_device(c.fault_kernel_device, device)) return 0;
    uint64_t n = ++g_kernel_launches;
    return n == c.fault_kernel_at ? n : 0;
}

CUresult sticky_error(int device) {
    if (device < 0 || device >= kMaxDevices) return CUDA_SUCCESS;
    return CUresult(g_sticky[device].load(std::memory_order_acquire));
}

void raise_kernel_fault(int device, const char* kernel, uint64_t launch) {
    say("kernel %s (launch %llu of it on device %d) faulted: an illegal memory access, injected (NC_SIM_FAULT_KERNEL); "
        "every later call on device %d's context returns CUDA_ERROR_ILLEGAL_ADDRESS, as on hardware",
        kernel, (unsigned long long)launch, device, device);
    if (device >= 0 && device < kMaxDevices) g_sticky[device].store(CUDA_ERROR_ILLEGAL_ADDRESS, std::memory_order_release);
}

}  // namespace sim
