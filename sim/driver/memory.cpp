// Device memory: each simulated device owns a reserved region of address space (mmap, PROT_NONE); every
// cuMemAlloc gets pages of its own there, followed by an inaccessible guard page, with its start placed so that
// its end comes as close to the guard page as the 256-byte start alignment CUDA promises allows. So:
//   - a kernel that runs past the end of an allocation faults on the guard page, unless its overrun stays
//     within the at most 255 bytes between the end and the guard page (the end rounded up to 256); those bytes
//     hold the poison pattern (a read returns NaN) and are checked after every kernel that could write them
//     (check_tail), so a write there is reported too; a read there shows up only as NaN in the results;
//   - freed memory is made inaccessible (PROT_NONE, pages given back) and its address range is not handed out
//     again until the region is exhausted, so a use after free faults;
//   - fresh allocations are filled with the poison pattern bytes ff 7f: NaN as f32 (0x7fff7fff), bf16 (0x7fff)
//     and f64, and 2147450879 as an i32 (an id no vocabulary has), so reading unwritten memory shows up;
//   - the SIGSEGV handler names the operation running, the address and the nearest allocation, then exits 1.
// Copies, memsets and ncsim_check_range check their exact byte ranges (check_range).
//
// Shared between processes (CUDA IPC, ipc.cpp): each device's region is a MAP_SHARED mapping of one memfd as
// large as the region, so an allocation is the same pages of that file in whichever process maps them. A
// peer maps the file's pages of an exported allocation (through /proc/PID/fd/N) into a free range of its own
// device's region; they then count as an allocation there (`imported`), so its bounds, guard page and
// use-after-close checks are those of any allocation. A free punches the pages out of the file.
#include "state.h"
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <unistd.h>

namespace sim {

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 256;
constexpr size_t kRegionBytes = 256ull << 30;  // address space per device (reserved, not committed)
constexpr uint8_t kPoison[2] = {0xff, 0x7f};

struct Region {
    uint64_t base = 0, end = 0, next = 0;  // next: bump pointer of never-used address space
    size_t used = 0;                        // bytes allocated (each rounded up to 256), against NC_SIM_MEM
    int fd = -1;                            // the memfd behind [base, end): offset = address - base
};

static std::mutex g_mem;
static std::vector<Region> g_regions;
static size_t g_capacity = 0;
static std::map<uint64_t, Allocation> g_live;   // by start
static std::map<uint64_t, Allocation> g_freed;  // by start; until the range is handed out again
static std::map<uintptr_t, size_t> g_pinned;    // pinned host memory: start -> bytes
static std::atomic<uint64_t> g_frees{0};         // counts frees: ends the emulator's pass cache (free_epoch)

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The pages an allocation of `size` bytes occupies (without its guard page).
static size_t span_pages(size_t size) { return round_up(round_up(size, kAlign), kPage); }

void memory_init(int devices, size_t bytes_per_device) {
    std::lock_guard<std::mutex> lock(g_mem);
    g_capacity = bytes_per_device;
    for (int d = 0; d < devices; d++) {
        // The file is sparse: only the pages allocations touch take memory.
        std::string name = "nc-sim-device-" + std::to_string(d);
        int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, off_t(kRegionBytes)) != 0)
            fault("creating the shared memory file of device %d (memfd_create, %zu GiB sparse) failed: %s", d,
                  kRegionBytes >> 30, strerror(errno));
        void* p = mmap(nullptr, kRegionBytes, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (p == MAP_FAILED) fault("reserving %zu GiB of address space for device %d failed", kRegionBytes >> 30, d);
        Region r;
        r.base = r.next = uint64_t(p);
        r.end = r.base + kRegionBytes;
        r.fd = fd;
        g_regions.push_back(r);
    }
}

static int region_of(uint64_t p) {
    for (size_t i = 0; i < g_regions.size(); i++)
        if (p >= g_regions[i].base && p < g_regions[i].end) return int(i);
    return -1;
}

bool is_device_pointer(uint64_t ptr) { return region_of(ptr) >= 0; }

static void fill_poison(uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = kPoison[(uintptr_t(p) + i) & 1];
}

// Address space for `pages` bytes plus a guard page: fresh space first, then (region exhausted) a freed range.
static bool take_space(Region& r, size_t pages, uint64_t& at) {
    if (r.next + pages + kPage <= r.end) {
        at = r.next;
        r.next += pages + kPage;
        return true;
    }
    for (auto it = g_freed.begin(); it != g_freed.end(); ++it) {
        const Allocation& f = it->second;
        uint64_t lo = f.start / kPage * kPage;
        if (region_of(lo) != region_of(r.base) || span_pages(f.size) < pages) continue;
        at = lo;
        g_freed.erase(it);  // the tail of a larger freed range is simply not reused
        return true;
    }
    return false;
}

static CUresult allocate(int device, size_t size, CUdeviceptr& out) {
    if (size == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc: 0 bytes asked for");
    std::lock_guard<std::mutex> lock(g_mem);
    Region& r = g_regions[size_t(device)];
    size_t charged = round_up(size, kAlign);
    if (charged > g_capacity - r.used) return CUDA_ERROR_OUT_OF_MEMORY;
    size_t pages = span_pages(size);
    uint64_t at;
    if (!take_space(r, pages, at)) return CUDA_ERROR_OUT_OF_MEMORY;
    if (mprotect(reinterpret_cast<void*>(at), pages, PROT_READ | PROT_WRITE) != 0)
        fault("mprotect of %zu bytes for an allocation failed", pages);
    fill_poison(reinterpret_cast<uint8_t*>(at), pages);
    Allocation a;
    a.start = at + pages - charged;  // the end as close to the guard page as 256-byte alignment allows
    a.size = size;
    a.device = device;
    a.live = true;
    g_live[a.start] = a;
    r.used += charged;
    out = a.start;
    return CUDA_SUCCESS;
}

static CUresult release(uint64_t ptr, const char* entry) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.find(ptr);
    if (it == g_live.end()) {
        auto f = g_freed.find(ptr);
        if (f != g_freed.end())
            fault("%s(0x%llx): this allocation of %zu bytes was already freed (double free)", entry,
                  (unsigned long long)ptr, f->second.size);
        return fail(CUDA_ERROR_INVALID_VALUE, "%s(0x%llx): not the start of a live device allocation", entry,
                    (unsigned long long)ptr);
    }
    Allocation a = it->second;
    if (a.imported)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s(0x%llx): this is another process's allocation opened with "
                    "cuIpcOpenMemHandle; close it with cuIpcCloseMemHandle", entry, (unsigned long long)ptr);
    g_live.erase(it);
    size_t pages = span_pages(a.size);
    uint64_t lo = a.start / kPage * kPage;
    const Region& r = g_regions[size_t(a.device)];
    // Give the pages back (a peer that still maps them reads zeros, as it reads garbage on a GPU).
    fallocate(r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(lo - r.base), off_t(pages));
    mprotect(reinterpret_cast<void*>(lo), pages, PROT_NONE);
    a.live = false;
    g_frees.fetch_add(1);
    g_freed[a.start] = a;
    // Remember a bounded number of freed ranges (for reports and reuse): the lowest addresses are the oldest
    // until the region wraps around.
    if (g_freed.size() > 200000) g_freed.erase(g_freed.begin());
    g_regions[size_t(a.device)].used -= round_up(a.size, kAlign);
    return CUDA_SUCCESS;
}

bool export_allocation(uint64_t ptr, IpcExport& out) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.find(ptr);
    if (it == g_live.end() || it->second.imported) return false;
    const Allocation& a = it->second;
    const Region& r = g_regions[size_t(a.device)];
    uint64_t lo = a.start / kPage * kPage;
    out.fd = r.fd;
    out.file_offset = lo - r.base;
    out.pages_bytes = span_pages(a.size);
    out.start_offset = a.start - lo;
    out.size = a.size;
    out.device = a.device;
    return true;
}

CUresult import_mapping(int device, int fd, const IpcExport& e, uint64_t& out) {
    std::lock_guard<std::mutex> lock(g_mem);
    Region& r = g_regions[size_t(device)];
    uint64_t at;
    if (!take_space(r, e.pages_bytes, at))
        return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuIpcOpenMemHandle: no address space left on device %d", device);
    void* p = mmap(reinterpret_cast<void*>(at), e.pages_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                   off_t(e.file_offset));
    if (p == MAP_FAILED) {
        // Put the reservation back (MAP_FIXED may have replaced it before failing).
        mmap(reinterpret_cast<void*>(at), e.pages_bytes, PROT_NONE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, r.fd,
             off_t(at - r.base));
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuIpcOpenMemHandle: mapping the peer's %zu bytes failed: %s",
                    e.pages_bytes, strerror(errno));
    }
    Allocation a;
    a.start = at + e.start_offset;
    a.size = e.size;
    a.device = device;
    a.live = true;
    a.imported = true;
    g_live[a.start] = a;
    out = a.start;
    return CUDA_SUCCESS;
}

CUresult close_import(uint64_t ptr) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.find(ptr);
    if (it == g_live.end() || !it->second.imported)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcCloseMemHandle(0x%llx): not a pointer cuIpcOpenMemHandle returned "
                    "(or already closed)", (unsigned long long)ptr);
    Allocation a = it->second;
    g_live.erase(it);
    uint64_t lo = a.start / kPage * kPage;
    const Region& r = g_regions[size_t(a.device)];
    // The range becomes this device's reserved, inaccessible address space again: a later access faults and
    // is reported as a use of a closed (freed) mapping.
    mmap(reinterpret_cast<void*>(lo), span_pages(a.size), PROT_NONE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, r.fd,
         off_t(lo - r.base));
    a.live = false;
    g_frees.fetch_add(1);
    g_freed[a.start] = a;
    return CUDA_SUCCESS;
}

// The allocation containing ptr, else the nearest one (live or freed) before or after it.
static bool lookup(uint64_t ptr, Allocation& out) {
    const Allocation* best = nullptr;
    uint64_t best_dist = ~0ull;
    for (auto* m : {&g_live, &g_freed}) {
        auto it = m->upper_bound(ptr);
        if (it != m->begin()) {
            const Allocation& a = std::prev(it)->second;
            uint64_t dist = ptr < a.start + a.size ? 0 : ptr - (a.start + a.size) + 1;
            if (dist < best_dist || (dist == best_dist && a.live)) best = &a, best_dist = dist;
        }
        if (it != m->end()) {
            uint64_t dist = it->second.start - ptr;
            if (dist < best_dist) best = &it->second, best_dist = dist;
        }
    }
    if (!best) return false;
    out = *best;
    return true;
}

bool find_allocation(uint64_t ptr, Allocation& out) {
    std::lock_guard<std::mutex> lock(g_mem);
    if (region_of(ptr) < 0) return false;
    return lookup(ptr, out);
}

static void describe(const Allocation& a, uint64_t ptr, char* buf, size_t n) {
    long long off = (long long)(ptr - a.start);
    std::snprintf(buf, n, "nearest allocation: %s %zu bytes at 0x%llx on device %d (the address is at offset %lld%s)",
                  a.live ? "live" : "FREED", a.size, (unsigned long long)a.start, a.device, off,
                  off >= (long long)a.size ? ", past its end" : off < 0 ? ", before its start" : "");
}

void check_range(uint64_t ptr, size_t bytes, const char* what) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.upper_bound(ptr);
    if (it != g_live.begin()) {
        const Allocation& a = std::prev(it)->second;
        if (ptr >= a.start && bytes <= a.size && ptr - a.start <= a.size - bytes) return;
    }
    char near[512] = "no device allocation is near it";
    Allocation a;
    if (lookup(ptr, a)) describe(a, ptr, near, sizeof near);
    fault("%s: the range [0x%llx, +%zu bytes) is not inside one live device allocation; %s", what,
          (unsigned long long)ptr, bytes, near);
}

void check_tail(uint64_t ptr, const char* kernel) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.upper_bound(ptr);
    if (it == g_live.begin()) return;
    const Allocation& a = std::prev(it)->second;
    if (ptr < a.start || ptr > a.start + a.size) return;
    const uint8_t* p = reinterpret_cast<const uint8_t*>(a.start);
    size_t slack_end = round_up(a.size, kAlign);
    for (size_t i = a.size; i < slack_end; i++)
        if (p[i] != kPoison[(a.start + i) & 1])
            fault("kernel %s wrote past the end of an allocation: byte %zu of a %zu-byte allocation at 0x%llx "
                  "(device %d) changed",
                  kernel, i, a.size, (unsigned long long)a.start, a.device);
}

// Called for a kernel's global accesses. The emulator remembers the allocation an access passed in
// (`passed`) and lets later accesses inside it pass without calling here, until the next free (free_epoch):
// so this runs about once per allocation a block touches, and may take the lock.
void kernel_access_check(const void* addr, size_t bytes, int is_write, const char* kernel, EmuAccessPassed* passed) {
    uint64_t p = uint64_t(addr);
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_live.upper_bound(p);
    if (it != g_live.begin()) {
        const Allocation& a = std::prev(it)->second;
        if (p >= a.start && p + bytes <= a.start + a.size) {
            *passed = {uintptr_t(a.start), uintptr_t(a.start + a.size)};
            return;
        }
    }
    char near[512] = "no device allocation is near it";
    Allocation a;
    if (lookup(p, a)) describe(a, p, near, sizeof near);
    fault("kernel %s %s %zu bytes at 0x%llx, outside every live device allocation; %s", kernel ? kernel : "?",
          is_write ? "writes" : "reads", bytes, (unsigned long long)p, near);
}

const std::atomic<uint64_t>* free_epoch() { return &g_frees; }

bool is_pinned_host(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(g_mem);
    uintptr_t x = uintptr_t(p);
    auto it = g_pinned.upper_bound(x);
    if (it == g_pinned.begin()) return false;
    --it;
    return x >= it->first && x + bytes <= it->first + it->second;
}

// ---- the fault handler ------------------------------------------------------------------------------------------
static thread_local const char* t_running = nullptr;
static std::atomic<const char* (*)()> g_kernel_name_source{nullptr};
static struct sigaction g_previous;

void set_running(const char* what) { t_running = what; }
const char* running() { return t_running; }
void set_kernel_name_source(const char* (*current_kernel)()) { g_kernel_name_source.store(current_kernel); }

static void on_segv(int sig, siginfo_t* info, void* uctx) {
    uint64_t addr = uint64_t(info->si_addr);
    if (region_of(addr) < 0) {
        // Not simulated device memory: whoever handled it before us (Rust's stack-overflow guard), or the default.
        if (g_previous.sa_flags & SA_SIGINFO) {
            if (g_previous.sa_sigaction) return g_previous.sa_sigaction(sig, info, uctx);
        } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
            return g_previous.sa_handler(sig);
        }
        signal(sig, SIG_DFL);
        return;  // the access faults again, now with the default action
    }
    // A block runs on the stream's worker or on one of the emulator's pool threads: ask the emulator first.
    const char* (*source)() = g_kernel_name_source.load();
    const char* kernel = source ? source() : nullptr;
    const char* what = kernel ? kernel : t_running;
    char near[512] = "no allocation is near it";
    // Best effort: the lock is only taken if free (a fault while a thread holds it must not hang the report).
    if (g_mem.try_lock()) {
        Allocation a;
        if (lookup(addr, a)) describe(a, addr, near, sizeof near);
        g_mem.unlock();
    }
    char line[1024];
    int n = std::snprintf(line, sizeof line,
                          "nc-sim: DEVICE FAULT: illegal address 0x%llx during %s; %s\n",
                          (unsigned long long)addr, what ? what : "(unknown operation)", near);
    if (n > 0) {
        ssize_t ignored = write(2, line, size_t(std::min(n, int(sizeof line) - 1)));
        (void)ignored;
    }
    _exit(1);
}

void install_fault_handler() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous);
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuMemAlloc", &c)) return r;
    if (CUresult r = inject_alloc_failure(context_device(c), bytes)) return r;  // NC_SIM_FAIL_ALLOC
    CUresult r = allocate(context_device(c), bytes, *out);
    if (r == CUDA_SUCCESS) trace("alloc", std::to_string(bytes), bytes);
    return r;
}

// cuMemFree synchronizes with the device (as the driver does): work queued on any stream that may still use
// the memory runs first.
SIM_API CUresult cuMemFree_v2(CUdeviceptr ptr) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuMemFree", &c)) return r;
    if (ptr == 0) return CUDA_SUCCESS;
    Allocation a;
    if (!find_allocation(ptr, a) || !a.live || a.start != ptr) return release(ptr, "cuMemFree");
    host_wait_context(primary_context(a.device), "cuMemFree");
    race_forget(a.start, a.size);
    trace("free", std::to_string(a.size), a.size);
    return release(ptr, "cuMemFree");
}

SIM_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
    SimContext* c = nullptr;
    if (CUresult r = need_context("cuMemGetInfo", &c)) return r;
    std::lock_guard<std::mutex> lock(g_mem);
    size_t used = g_regions[size_t(context_device(c))].used;
    if (free_bytes) *free_bytes = g_capacity - used;
    if (total_bytes) *total_bytes = g_capacity;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* size, CUdeviceptr ptr) {
    Allocation a;
    if (!find_allocation(ptr, a) || !a.live || ptr < a.start || ptr >= a.start + a.size)
        return fail(CUDA_ERROR_NOT_FOUND, "cuMemGetAddressRange: 0x%llx is in no live allocation",
                    (unsigned long long)ptr);
    if (base) *base = a.start;
    if (size) *size = a.size;
    return CUDA_SUCCESS;
}

// Pinned host memory is ordinary host memory here; it is only remembered, so that async copies to and from it
// behave as the driver documents for page-locked memory (no staging, no wait).
SIM_API CUresult cuMemHostAlloc(void** out, size_t bytes, unsigned flags) {
    if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (flags & ~1u) return unsupported("cuMemHostAlloc", "flags 0x%x (only CU_MEMHOSTALLOC_PORTABLE)", flags);
    void* p = nullptr;
    if (posix_memalign(&p, kPage, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> lock(g_mem);
    g_pinned[uintptr_t(p)] = bytes;
    *out = p;
    return CUDA_SUCCESS;
}
SIM_API CUresult cuMemAllocHost_v2(void** out, size_t bytes) { return cuMemHostAlloc(out, bytes, 0); }
SIM_API CUresult cuMemFreeHost(void* p) {
    std::lock_guard<std::mutex> lock(g_mem);
    auto it = g_pinned.find(uintptr_t(p));
    if (it == g_pinned.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost(%p): not pinned host memory", p);
    g_pinned.erase(it);
    free(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuPointerGetAttribute(void* data, int attribute, CUdeviceptr ptr) {
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    Allocation a;
    bool device = find_allocation(ptr, a) && a.live && ptr >= a.start && ptr < a.start + a.size;
    if (!device) {
        if (is_pinned_host(reinterpret_cast<void*>(ptr), 1) && attribute == CU_POINTER_ATTRIBUTE_MEMORY_TYPE) {
            *static_cast<unsigned*>(data) = CU_MEMORYTYPE_HOST;
            return CUDA_SUCCESS;
        }
        return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: 0x%llx is not simulated device memory",
                    (unsigned long long)ptr);
    }
    switch (attribute) {
        case CU_POINTER_ATTRIBUTE_CONTEXT: *static_cast<CUcontext*>(data) = primary_context(a.device); break;
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *static_cast<unsigned*>(data) = CU_MEMORYTYPE_DEVICE; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *static_cast<CUdeviceptr*>(data) = ptr; break;
        case CU_POINTER_ATTRIBUTE_IS_MANAGED: *static_cast<int*>(data) = 0; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *static_cast<int*>(data) = a.device; break;
        case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *static_cast<CUdeviceptr*>(data) = a.start; break;
        case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *static_cast<size_t*>(data) = a.size; break;
        default: return unsupported("cuPointerGetAttribute", "attribute %d (pointer 0x%llx)", attribute,
                                    (unsigned long long)ptr);
    }
    return CUDA_SUCCESS;
}
