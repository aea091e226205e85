// The simulated driver's internal interfaces, shared by its source files (one concern each: config.cpp,
// device.cpp, memory.cpp, copy.cpp, stream.cpp, race.cpp, module.cpp, launch.cpp, trace.cpp, errors.cpp).
// Nothing here is exported: the library exports only the documented cu* entry points and ncsim.h.
#pragma once
#include "cuda_abi.h"
#include "../../kernels-ptx/emu/emu_access.h"
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace sim {

// ---- config.cpp: the simulated machine, from the environment (read once, at cuInit) -------------------------
struct Config {
    int devices = 1;                   // NC_SIM_DEVICES
    size_t mem_bytes = 4ull << 30;     // NC_SIM_MEM, per device
    bool race = false;                 // NC_SIM_RACE=1
    std::string trace_path;            // NC_SIM_TRACE
    int plant_skip_syncthreads = -1;   // NC_SIM_PLANT_SKIP_SYNCTHREADS (a planted bug; -1: off)
    // Fault injection (inject.cpp), off by default. -1 as a device: any.
    uint64_t fail_alloc_at = 0;  // NC_SIM_FAIL_ALLOC=N[@D]: from the N-th cuMemAlloc on (0: off)
    int fail_alloc_device = -1;
    std::string fault_kernel;     // NC_SIM_FAULT_KERNEL=NAME:N[@D]: the N-th launch of NAME faults
    uint64_t fault_kernel_at = 0;
    int fault_kernel_device = -1;
};
constexpr int kMaxDevices = 16;  // NC_SIM_DEVICES' limit
// Parses the environment; on a bad value prints what is wrong and what to do, and returns false.
bool load_config(Config& out);
const Config& config();

// ---- errors.cpp: messages -------------------------------------------------------------------------------------
// One "nc-sim: ..." line on stderr.
void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Says that `entry` is not implemented for the arguments described, and returns CUDA_ERROR_NOT_SUPPORTED.
CUresult unsupported(const char* entry, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Says why a call failed and returns `code` (an invalid argument, an out-of-range launch...).
CUresult fail(CUresult code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Reports a device fault (what a GPU would raise as an illegal address, found by a check) and ends the process
// with status 1, as compute-sanitizer stops a run.
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- inject.cpp: fault injection (NC_SIM_FAIL_ALLOC, NC_SIM_FAULT_KERNEL) ----------------------------------
// CUDA_ERROR_OUT_OF_MEMORY when NC_SIM_FAIL_ALLOC says this cuMemAlloc on `device` fails (it counts the calls).
CUresult inject_alloc_failure(int device, size_t bytes);
// For a launch of `kernel` on `device`: the launch's number (from 1) when NC_SIM_FAULT_KERNEL says it faults, else 0.
uint64_t inject_kernel_fault(const std::string& kernel, int device);
// Called when the faulting launch runs: says so, and breaks the device's context for good.
void raise_kernel_fault(int device, const char* kernel, uint64_t launch);
// CUDA_SUCCESS, or the sticky error every call on the device's context returns after a kernel fault.
CUresult sticky_error(int device);

// ---- device.cpp: devices and contexts ----------------------------------------------------------------------
bool initialized();
SimContext* primary_context(int device);  // nullptr for a bad ordinal
SimContext* current_context();
// The current context, or an error code: CUDA_ERROR_NOT_INITIALIZED before cuInit, INVALID_CONTEXT when none.
CUresult need_context(const char* entry, SimContext** out);
int context_device(SimContext* ctx);

// ---- memory.cpp: device allocations --------------------------------------------------------------------------
struct Allocation {
    uint64_t start = 0;  // first byte (256-byte aligned)
    size_t size = 0;     // bytes asked for
    int device = -1;
    bool live = false;
    bool imported = false;  // another process's allocation opened with cuIpcOpenMemHandle (ipc.cpp)
};
void memory_init(int devices, size_t bytes_per_device);
// What a peer needs to map an allocation (ipc.cpp): the device's shared memory file, where the allocation's
// pages lie in it, and where the allocation starts in its first page.
struct IpcExport {
    int fd = -1;
    uint64_t file_offset = 0, pages_bytes = 0, start_offset = 0, size = 0;
    int device = -1;
};
// False unless ptr is the start of a live allocation of this process.
bool export_allocation(uint64_t ptr, IpcExport& out);
// Maps the exporter's pages (`fd`: the exporter's file, opened here) into free address space of `device`,
// registered as a live allocation (imported) of e.size bytes; its start in *out.
CUresult import_mapping(int device, int fd, const IpcExport& e, uint64_t& out);
// Unmaps an imported allocation (its start); a later access is reported as a use of closed memory.
CUresult close_import(uint64_t ptr);
// The allocation (live or freed) that contains [ptr, ptr + bytes), or that starts nearest before ptr; false
// when ptr lies in no simulated device's memory.
bool find_allocation(uint64_t ptr, Allocation& out);
bool is_device_pointer(uint64_t ptr);
// Checks that [ptr, ptr + bytes) lies inside one live allocation; on a violation reports `what`, the range and
// the nearest allocation, and ends the process (a GPU raises an illegal address there).
void check_range(uint64_t ptr, size_t bytes, const char* what);
// Pinned (page-locked) host memory from cuMemAllocHost / cuMemHostAlloc: async copies from and to it do not
// stage or wait.
bool is_pinned_host(const void* p, size_t bytes);
// After a kernel ran: the bytes between the end of each written allocation and its guard page (the end is only
// 256-byte aligned, the guard page 4096) must still hold the poison; a change means the kernel wrote past the end.
void check_tail(uint64_t ptr_in_allocation, const char* kernel);
void install_fault_handler();
// The emulator's access check (emu_set_access_check): every global-memory access a kernel makes must lie inside
// one live allocation; otherwise the run stops with the kernel, the address and the nearest allocation. It
// sets *passed to the allocation, which the emulator may trust until free_epoch() changes (emu_race.h).
void kernel_access_check(const void* addr, size_t bytes, int is_write, const char* kernel, EmuAccessPassed* passed);
const std::atomic<uint64_t>* free_epoch();
// The operation a thread is running, for the fault handler: set by stream workers and around kernels.
void set_running(const char* what);
const char* running();
// Where the fault handler asks which kernel the faulting OS thread was running (the emulator's pool threads
// run blocks of any launch): set by the first registered kernel module.
void set_kernel_name_source(const char* (*current_kernel)());

// ---- ipc.cpp: CUDA IPC and peer access -------------------------------------------------------------------------
// Reads NC_SIM_PEER (at cuInit); on a bad value says what to write and returns false.
bool ipc_init();

// ---- stream.cpp: streams, events, host synchronization -----------------------------------------------------
struct Access {
    uint64_t start;
    size_t bytes;
    bool write;
};
// Queues `run` on `stream` (a CUstream handle, 0 / legacy allowed) after everything queued there before.
// `accesses` declare what it touches (race checker, trace). Returns the resolved stream or an error code.
CUresult enqueue(const char* entry, CUstream stream, std::string what, std::function<void()> run,
                 std::vector<Access> accesses, SimStream** resolved = nullptr);
// Resolves a CUstream handle of the current context (0 and CU_STREAM_LEGACY are its legacy stream).
CUresult resolve_stream(const char* entry, CUstream handle, SimStream** out);
// Blocks until everything queued on `s` so far has run (a host synchronization); returns the device's sticky
// error when a kernel faulted (inject.cpp), as a synchronization on hardware reports it.
CUresult host_wait_stream(SimStream* s, const char* why);
// Blocks until every stream of the context has drained (cuCtxSynchronize, cuMemFree); the sticky error too.
CUresult host_wait_context(SimContext* ctx, const char* why);
// Race mode: whether work that writes [start, start + bytes) was queued and the host has not waited for it
// (no synchronization since), and which; before an IPC export (ipc.cpp).
bool host_unwaited_write(uint64_t start, size_t bytes, std::string& what);
SimStream* legacy_stream(SimContext* ctx);
void destroy_context_streams(SimContext* ctx);

// ---- race.cpp: the happens-before checker (NC_SIM_RACE=1) ---------------------------------------------------
// A vector clock: entry i counts the operations of stream i that are known to have happened before.
using Clock = std::vector<uint64_t>;
void clock_merge(Clock& into, const Clock& from);
int race_new_stream_id();
// Checks an operation's accesses against the earlier ones on other streams (called with the enqueue lock
// held, in host order: the verdict does not depend on the timing of the run) and records them.
void race_check(int stream_id, uint64_t seq, const Clock& clock, const std::string& what,
                const std::vector<Access>& accesses);
// Drops what the checker remembers about [start, start + bytes) (freed memory).
void race_forget(uint64_t start, size_t bytes);
// Whether a write to [start, start + bytes) was queued that `host` (the host's clock) is not ordered after,
// and which (called with the enqueue lock held).
bool race_unwaited_write_locked(uint64_t start, size_t bytes, const Clock& host, std::string& what);
// A random delay before an operation runs, so that stream workers interleave differently from run to run.
void race_delay();
// The elementwise minimum of the host's clock and every live stream's clock (called with the enqueue lock held).
Clock sync_floor_locked();

// ---- trace.cpp: NC_SIM_TRACE ---------------------------------------------------------------------------------
void trace(const char* kind, const std::string& detail, uint64_t bytes = 0);

// ---- module.cpp / kernel_registry.h: kernels ------------------------------------------------------------------
enum class ParamKind : uint8_t { Value, ReadPtr, WritePtr };
struct ParamInfo {
    size_t size;
    ParamKind kind;
    bool integer;     // an integer value (a count or size): checked for plausibility at launch
    bool is_signed;
};
// Runs the kernel on the emulator; returns the number of shared-memory race reports the emulator printed
// during it (race mode: a missing __syncthreads, an early read of a cp.async destination).
using KernelRun = int (*)(const char* name, void** params, const unsigned grid[3], const unsigned block[3]);
struct RegisteredKernel {
    const char* name;
    std::vector<ParamInfo> params;
    KernelRun run;
};
bool register_module(const char* name, uint64_t source_hash, std::vector<RegisteredKernel> kernels,
                     const char* (*current_kernel)());

// A kernel as the PTX declares it, bound to its emulated C++ body.
struct PtxParam {
    size_t size;
    size_t align;
};
struct FunctionInfo {
    std::string name;
    std::vector<PtxParam> params;
    unsigned maxntid = 0;           // product of .maxntid, 0 when absent
    size_t static_shared = 0;       // bytes of .shared the entry (and its module) declares
    size_t max_dynamic_shared = 0;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    const RegisteredKernel* kernel = nullptr;
};

// The limits the launch checks use (an H100's).
constexpr size_t kSharedPerBlock = 48 * 1024;
constexpr size_t kSharedPerBlockOptin = 227 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;

}  // namespace sim

struct SimFunction {
    sim::FunctionInfo info;
    SimModule* module;
};
struct SimModule {
    std::string name;
    SimContext* ctx;
    std::vector<std::unique_ptr<SimFunction>> functions;
};
