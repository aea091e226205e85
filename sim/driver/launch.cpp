// cuLaunchKernel: checks the launch as the hardware and driver do, copies the arguments (the caller may reuse
// its values once the call returns), and queues the emulated kernel on the stream. Checks, each failing with
// CUDA_ERROR_INVALID_VALUE and one stderr line naming the kernel:
//   - grid and block dimensions non-zero; block x, y <= 1024, z <= 64, x*y*z <= 1024 and <= the entry's
//     .maxntid; grid y, z <= 65535;
//   - static plus dynamic shared memory <= 48 KiB, or <= the function's max-dynamic-shared attribute plus its
//     static shared memory when that was raised;
//   - the parameters: with `extra` (CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE) the buffer's size must be the PTX
//     .param list's packed size. With kernelParams the driver API carries no sizes (an array of pointers to the
//     values): the driver reads each parameter's PTX size from its pointer, as the real driver does, so a
//     narrower value read as a wider one cannot be seen here (see docs/simulated-gpu.md);
//   - pointer parameters (the C++ kernel's T* / const T*): a non-null one must point into simulated device memory
//     of the stream's device (a host pointer or another device's memory would fault on a GPU);
//   - 64-bit integer parameters (counts, sizes): a value of 2^48 or more is refused as implausible (no count
//     reaches it): a 32-bit value passed where the kernel reads 64 bits leaves the high half to whatever lies
//     next to it in the caller's memory, and this is how that shows when the neighbour is not zero (when it is
//     zero, the device reads the same correct value as the simulator does).
// Kernels of different streams run concurrently (the emulator runs the blocks of every launch on one pool of
// OS threads); after a kernel, the slack bytes after the end of every allocation it could write are checked
// (memory.cpp), and in race mode a shared-memory race the emulator reported inside it stops the run.
// NC_SIM_FAULT_KERNEL (inject.cpp) picks a launch that faults instead of running, leaving the sticky error.
#include "state.h"
#include <cstring>

namespace sim {

static size_t align_up(size_t n, size_t a) { return a ? (n + a - 1) / a * a : n; }

// The arguments, copied: one buffer with each value at its PTX offset, and the pointers into it.
struct Arguments {
    std::vector<uint8_t> bytes;
    std::vector<void*> pointers;
};

static CUresult copy_arguments(const FunctionInfo& f, void** params, void** extra, Arguments& args) {
    std::vector<size_t> offsets;
    size_t total = 0;
    for (const PtxParam& p : f.params) {
        total = align_up(total, p.align);
        offsets.push_back(total);
        total += p.size;
    }
    args.bytes.assign(total + 16, 0);
    if (params && extra)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: both kernelParams and extra were given", f.name.c_str());
    if (extra) {
        const void* buffer = nullptr;
        const size_t* size = nullptr;
        for (size_t i = 0; extra[i] != SIM_LAUNCH_PARAM_END; i += 2) {
            if (extra[i] == SIM_LAUNCH_PARAM_BUFFER_POINTER) buffer = extra[i + 1];
            else if (extra[i] == SIM_LAUNCH_PARAM_BUFFER_SIZE) size = static_cast<const size_t*>(extra[i + 1]);
            else return unsupported("cuLaunchKernel", "extra key %p for %s", extra[i], f.name.c_str());
        }
        if (!buffer || !size)
            return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: extra lacks the buffer pointer or size", f.name.c_str());
        size_t want = align_up(total, 1);
        if (*size != want)
            return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: the parameter buffer holds %zu bytes, the PTX's "
                        "%zu parameters take %zu: an argument has the wrong width or is missing",
                        f.name.c_str(), *size, f.params.size(), want);
        std::memcpy(args.bytes.data(), buffer, total);
    } else {
        if (!params && !f.params.empty())
            return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: kernelParams is null, the kernel takes %zu parameters",
                        f.name.c_str(), f.params.size());
        for (size_t i = 0; i < f.params.size(); i++) {
            if (!params[i])
                return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: kernelParams[%zu] is null", f.name.c_str(), i);
            std::memcpy(args.bytes.data() + offsets[i], params[i], f.params[i].size);
        }
    }
    for (size_t off : offsets) args.pointers.push_back(args.bytes.data() + off);
    return CUDA_SUCCESS;
}

static CUresult check_shape(const FunctionInfo& f, const unsigned g[3], const unsigned b[3], unsigned shared) {
    const char* k = f.name.c_str();
    if (!g[0] || !g[1] || !g[2] || !b[0] || !b[1] || !b[2])
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: grid (%u, %u, %u) block (%u, %u, %u) has a zero dimension",
                    k, g[0], g[1], g[2], b[0], b[1], b[2]);
    unsigned long long threads = 1ull * b[0] * b[1] * b[2];
    unsigned limit = f.maxntid ? f.maxntid : kMaxThreadsPerBlock;
    if (b[0] > 1024 || b[1] > 1024 || b[2] > 64 || threads > kMaxThreadsPerBlock || threads > limit)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: block (%u, %u, %u) = %llu threads exceeds the limit "
                    "(%u: the entry's .maxntid, at most 1024; x, y <= 1024, z <= 64)", k, b[0], b[1], b[2], threads, limit);
    if (g[0] > 2147483647u || g[1] > 65535 || g[2] > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: grid (%u, %u, %u) exceeds the limits (x < 2^31, y and z "
                    "<= 65535)", k, g[0], g[1], g[2]);
    size_t dynamic_limit = f.max_dynamic_shared;
    if (f.static_shared + shared > kSharedPerBlock && shared > dynamic_limit)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: %zu bytes of static and %u of dynamic shared memory "
                    "exceed 48 KiB per block (raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES to opt in; now %zu)",
                    k, f.static_shared, shared, dynamic_limit);
    return CUDA_SUCCESS;
}

// The pointer parameters: where they point must be this device's memory; they are the kernel's declared accesses.
static CUresult pointer_accesses(const FunctionInfo& f, const Arguments& args, int device,
                                 std::vector<Access>& accesses, std::vector<uint64_t>& written) {
    const std::vector<ParamInfo>& kinds = f.kernel->params;
    for (size_t i = 0; i < kinds.size(); i++) {
        if (kinds[i].kind == ParamKind::Value && kinds[i].integer && kinds[i].size == 8) {
            uint64_t v;
            std::memcpy(&v, args.pointers[i], sizeof v);
            if (kinds[i].is_signed && int64_t(v) < 0 && int64_t(v) >= -(1ll << 47)) continue;  // small negative
            if (v >= (1ull << 48))
                return fail(CUDA_ERROR_INVALID_VALUE,
                            "cuLaunchKernel %s: 64-bit integer parameter %zu is 0x%016llx, not a plausible count: was a "
                            "32-bit value passed where the kernel takes 64 bits (its high half read from the "
                            "neighbouring memory)?", f.name.c_str(), i, (unsigned long long)v);
            continue;
        }
        if (kinds[i].kind == ParamKind::Value) continue;
        uint64_t p;
        std::memcpy(&p, args.pointers[i], sizeof p);
        if (p == 0) continue;
        Allocation a;
        if (!find_allocation(p, a))
            fault("cuLaunchKernel %s: pointer parameter %zu is 0x%llx, which is not device memory (a host pointer, "
                  "or garbage: on a GPU the kernel faults when it touches it)",
                  f.name.c_str(), i, (unsigned long long)p);
        if (a.device != device)
            fault("cuLaunchKernel %s on device %d: pointer parameter %zu (0x%llx) is memory of device %d (peer access "
                  "is not simulated)", f.name.c_str(), device, i, (unsigned long long)p, a.device);
        if (!a.live || p < a.start || p > a.start + a.size) continue;  // a use after free faults when it happens
        bool write = kinds[i].kind == ParamKind::WritePtr;
        accesses.push_back({p, size_t(a.start + a.size - p), write});
        if (write) written.push_back(p);
    }
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned shared, CUstream stream, void** params, void** extra) {
    if (!f) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: null function");
    SimContext* ctx = nullptr;
    if (CUresult r = need_context("cuLaunchKernel", &ctx)) return r;
    const FunctionInfo& info = f->info;
    if (f->module->ctx != ctx)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel %s: its module was loaded on device %d, the current "
                    "context is device %d", info.name.c_str(), context_device(f->module->ctx), context_device(ctx));
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (CUresult r = check_shape(info, grid, block, shared)) return r;
    auto args = std::make_shared<Arguments>();
    if (CUresult r = copy_arguments(info, params, extra, *args)) return r;
    std::vector<Access> accesses;
    std::vector<uint64_t> written;
    if (CUresult r = pointer_accesses(info, *args, context_device(ctx), accesses, written)) return r;

    const RegisteredKernel* kernel = info.kernel;
    std::string what = info.name + " grid=(" + std::to_string(gx) + "," + std::to_string(gy) + "," +
                       std::to_string(gz) + ") block=" + std::to_string(bx);
    int device = context_device(ctx);
    uint64_t faulting_launch = inject_kernel_fault(info.name, device);  // NC_SIM_FAULT_KERNEL
    auto run = [kernel, args, gx, gy, gz, bx, by, bz, written, device, faulting_launch] {
        if (faulting_launch) return raise_kernel_fault(device, kernel->name, faulting_launch);
        const unsigned g[3] = {gx, gy, gz}, b[3] = {bx, by, bz};
        int races = kernel->run(kernel->name, args->pointers.data(), g, b);
        for (uint64_t p : written) check_tail(p, kernel->name);
        if (races > 0)
            fault("kernel %s: the emulator reported %d shared-memory race(s) inside it (above: a missing "
                  "__syncthreads or __syncwarp, or a read of a cp.async destination before its wait)",
                  kernel->name, races);
    };
    if (CUresult r = enqueue("cuLaunchKernel", stream, "kernel " + what, run, std::move(accesses))) return r;
    trace("launch", what);
    return CUDA_SUCCESS;
}
