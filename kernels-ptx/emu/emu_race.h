// Race mode for emu.h: reports a shared-memory race inside a block (a missing __syncthreads or __syncwarp)
// and a read of a cp.async destination before the wait_group that completes it, instead of only giving a
// wrong number. On with NC_SIM_RACE=1 or emu_race_enable(true); emu_race_reports() counts the reports (one per racing access).
//
// How accesses are seen. The kernels are compiled with g++ -fsanitize=thread (and, for speed,
// --param=tsan-instrument-func-entry-exit=0), which makes the compiler call __tsan_read4(addr),
// __tsan_write8(addr), ... before every load and store. The program is linked WITHOUT libtsan: this header
// defines those entry points itself. Outside a block in race mode they return at once; inside one they check
// the address against the block's shared memory, which is this module's thread_local block on the running OS
// thread (emu.h's __shared__ is `static thread_local`; the emulator's own thread_locals are excluded). Code
// compiled without -fsanitize=thread runs as usual; in race mode it then gets only the thread-order shuffle
// and cp.async timing below, and emu_race_instrumented() says so.
//
// What is a race. Every byte of shared memory keeps its last write (thread, block interval, warp interval)
// and its readers in the current interval. A block interval is the stretch between two __syncthreads of the
// block; a warp interval is the stretch between two __syncwarp (or __syncthreads) of one warp. Shuffles (here
// a lane waits only for its partner's value), mma and ldmatrix do not order memory accesses (as on the
// device), so they do not end an interval. Two accesses to a byte by different threads, at least one a write, race when
// they fall in the same block interval and either the threads are in different warps or in the same warp
// interval. Since the check compares intervals, not timings, it does not depend on the order the fibers ran
// in; the order is shuffled anyway (emu.h), so a race also tends to change the numbers. Also reported: a
// read of shared bytes the block has not written (shared memory starts undefined), and any access to the
// 16 bytes of a cp.async that has not been completed by a wait_group of the issuing thread.
//
// A report names the kernel, the block, the barrier interval (the number of __syncthreads the block had
// passed), the two threads and the shared variable (from the module's symbol table, when it has one).
#pragma once
#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "emu_access.h"

// ---- switches ---------------------------------------------------------------------------------------------
inline std::atomic<int> emu_race_override{-1};  // -1: NC_SIM_RACE decides; 0 / 1: emu_race_enable
inline std::atomic<uint64_t> emu_race_count{0};

inline bool emu_race_enabled() {
    int o = emu_race_override.load(std::memory_order_relaxed);
    if (o >= 0) return o == 1;
    static const bool from_env = emu_env_number("NC_SIM_RACE", 0, 1, 0) == 1;
    return from_env;
}
inline void emu_race_enable(bool on) { emu_race_override.store(on ? 1 : 0); }
inline uint64_t emu_race_reports() { return emu_race_count.load(); }
// The seed of the thread-order shuffle and the cp.async landing times (NC_SIM_SEED, default 1).
inline uint64_t emu_race_seed() {
    static const uint64_t seed = (uint64_t)emu_env_number("NC_SIM_SEED", 0, 1L << 62, 1);
    return seed;
}
#ifdef __SANITIZE_THREAD__
inline constexpr bool emu_race_instrumented() { return true; }
#else
inline constexpr bool emu_race_instrumented() { return false; }
#endif

// Planted bugs for the checker's own tests (test_race.cpp): the n-th (0-based, counted per thread)
// __syncthreads, __syncwarp or cp.async wait_group of every thread does nothing. -1: off.
inline int emu_plant_skip_syncthreads = -1, emu_plant_skip_syncwarp = -1, emu_plant_skip_cp_wait = -1;

// ---- the shadow of one OS thread's shared memory -----------------------------------------------------------
struct EmuRaceCell {
    uint32_t write_block = 0;  // block interval of the last write (0: none yet)
    uint32_t write_warp = 0;   // the writer's warp interval at that write
    uint32_t read_block = 0;   // block interval of the reads below
    uint32_t read_warp = 0;    // the last reader's warp interval
    uint32_t read_warps = 0;   // warps (bit w) that read in read_block
    uint16_t writer = 0, reader = 0;
    uint8_t pending = 0;  // a cp.async in flight writes this byte
    uint8_t ignore = 0;   // the emulator's own thread_local bytes
};

// A check of every other access a kernel makes (global memory, as far as the kernel knows: not shared memory,
// not the thread's own stack), for a checker such as the simulated driver's bounds check: called as
// check(addr, bytes, is_write, kernel name, passed) from the thread running the kernel, for code compiled with
// -fsanitize=thread, race mode or not. Null (the default): no check.
//
// The pass cache. A check that returns may set *passed to a byte range [lo, hi) around the access in which
// every access would pass too (the simulated driver: the live allocation it found). When the check was
// registered with an `epoch` counter, the emulator then lets later accesses inside that range pass without
// calling the check, until the counter changes (the driver counts frees: a free may end any range). A few
// ranges are kept per OS thread. Without an epoch every access calls the check (what a test that counts
// accesses wants). Why: a kernel makes one check per load and store, and the driver's lookup takes a lock.
using EmuAccessCheck = void (*)(const void* addr, size_t bytes, int is_write, const char* kernel,
                                EmuAccessPassed* passed);
inline std::atomic<EmuAccessCheck> emu_access_check{nullptr};
inline std::atomic<const std::atomic<uint64_t>*> emu_access_epoch{nullptr};
inline void emu_set_access_check(EmuAccessCheck check, const std::atomic<uint64_t>* epoch = nullptr) {
    emu_access_epoch.store(epoch);
    emu_access_check.store(check);
}

struct EmuRaceBlock {
    bool race_on = false;            // the block runs in race mode (b.race is set)
    EmuAccessCheck check = nullptr;  // emu_access_check when the block started
    const std::atomic<uint64_t>* epoch = nullptr;  // emu_access_epoch when the block started: the pass cache's
    static constexpr unsigned PASSED = 4;          // ranges the last checks passed, valid while *epoch reads
    EmuAccessPassed passed[PASSED];                // passed_epoch (a range with lo == hi is empty)
    uint64_t passed_epoch = 0;
    unsigned passed_next = 0;  // the slot the next range replaces
    uintptr_t lo = 0;  // this OS thread's thread_local block of the module: [lo, lo + size)
    size_t size = 0;
    EmuRaceCell* cells = nullptr;
    uint32_t gen = 0;          // the last interval number handed out
    uint32_t block_first = 0;  // the block's first interval: writes before it are another block's
    uint32_t block_epoch = 0;
    uint32_t warp_epoch[32] = {};
    EmuBlock* b = nullptr;
    unsigned printed[6] = {};  // reports printed, per kind, for launch `launch` on this OS thread
    uint64_t launch = 0;
    const char* module = nullptr;
};
// Set only while kernel code runs (emu.h's emu_fiber_main sets it around the kernel call; every emulator
// function a kernel calls turns it off with EmuHooksOff), so the hooks see the kernel's own accesses, not the
// emulator's (the std code it calls is instrumented too). A field of emu.h's EmuTls.
#define emu_race_active (emu_tls.race_active)
// On a fiber, pass the emu_here() the caller already has: that saves finding it again.
struct EmuHooksOff {
    EmuTls& tls;
    EmuRaceBlock* saved;
    EMU_RT explicit EmuHooksOff(EmuTls& t = emu_here()) : tls(t), saved(t.race_active) { t.race_active = nullptr; }
    EMU_RT ~EmuHooksOff() { tls.race_active = saved; }
};
inline thread_local char emu_race_anchor = 0;                 // locates this module's thread_local block

struct EmuTlsFind {
    uintptr_t anchor, lo = 0;
    size_t size = 0;
    const char* name = nullptr;
};
EMU_RT inline int emu_tls_find(struct dl_phdr_info* info, size_t, void* data) {
    auto* f = static_cast<EmuTlsFind*>(data);
    if (!info->dlpi_tls_data) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type != PT_TLS) continue;
        uintptr_t lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
        if (f->anchor >= lo && f->anchor < lo + info->dlpi_phdr[i].p_memsz) {
            f->lo = lo;
            f->size = info->dlpi_phdr[i].p_memsz;
            f->name = info->dlpi_name;
            return 1;
        }
    }
    return 0;
}

EMU_RT inline void emu_race_ignore(EmuRaceBlock& r, const void* p, size_t n) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    for (size_t i = 0; i < n; i++)
        if (a + i - r.lo < r.size) r.cells[a + i - r.lo].ignore = 1;
}

// This OS thread's shadow, made on its first block in race mode; null when the thread_local block cannot be
// found (then only the shuffle and cp.async timing apply).
EMU_RT inline EmuRaceBlock* emu_race_shadow(EmuBlock& b) {
    static thread_local EmuRaceBlock* shadow = nullptr;
    static thread_local bool tried = false;
    if (tried) return shadow;
    tried = true;
    emu_race_anchor = 1;  // makes sure this thread's block is allocated (dynamic TLS of a dlopen'ed library)
    EmuTlsFind f{reinterpret_cast<uintptr_t>(&emu_race_anchor)};
    dl_iterate_phdr(emu_tls_find, &f);
    if (!f.size) {
        std::fprintf(stderr, "emu: race mode cannot find the thread_local block holding shared memory: "
                             "shared-memory races are not checked\n");
        return nullptr;
    }
    auto* r = new EmuRaceBlock;  // kept for the thread's life: blocks reuse it
    r->lo = f.lo;
    r->size = f.size;
    r->module = f.name;
    r->cells = new EmuRaceCell[f.size];
    emu_race_ignore(*r, &emu_tls, sizeof emu_tls);  // threadIdx, ..., emu_block, emu_race_active
    emu_race_ignore(*r, &b, sizeof b);
    emu_race_ignore(*r, &emu_race_anchor, sizeof emu_race_anchor);
    shadow = r;
    return shadow;
}

// ---- naming a shared byte: the module's STT_TLS symbols ---------------------------------------------------
struct EmuTlsSymbol {
    uint64_t offset, size;
    std::string name;
};
// "fa::flash_forward<64>(bf16 const*, ...)::sV" -> "fa::flash_forward<64>::sV": the parameter lists say little.
inline std::string emu_drop_parameters(const char* name) {
    std::string out;
    int depth = 0;
    for (const char* p = name; *p; p++) {
        if (*p == '(') depth++;
        if (depth == 0) out += *p;
        if (*p == ')' && depth > 0) depth--;
    }
    return out;
}
// Reads the TLS symbols of the ELF file `path` (the symbol table, not only the dynamic one: a function's
// static thread_local is a local symbol). Empty when the file is stripped or unreadable.
inline std::vector<EmuTlsSymbol> emu_tls_symbols(const char* path) {
    std::vector<EmuTlsSymbol> out;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return out;
    struct stat st;
    void* map = fstat(fd, &st) == 0 ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (map == MAP_FAILED) return out;
    auto* base = static_cast<const char*>(map);
    auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
    bool ok = (size_t)st.st_size >= sizeof(Elf64_Ehdr) && std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
              eh->e_ident[EI_CLASS] == ELFCLASS64 && eh->e_shoff + (uint64_t)eh->e_shnum * sizeof(Elf64_Shdr) <= (uint64_t)st.st_size;
    if (ok) {
        auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; i++) {
            if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
            auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
            const char* strs = base + sh[sh[i].sh_link].sh_offset;
            for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); k++) {
                if (ELF64_ST_TYPE(syms[k].st_info) != STT_TLS) continue;
                const char* raw = strs + syms[k].st_name;
                int status = 0;
                char* pretty = abi::__cxa_demangle(raw, nullptr, nullptr, &status);
                out.push_back({syms[k].st_value, syms[k].st_size, status == 0 && pretty ? emu_drop_parameters(pretty) : raw});
                std::free(pretty);
            }
        }
    }
    munmap(map, st.st_size);
    return out;
}
inline std::string emu_shared_name(const EmuRaceBlock& r, size_t offset) {
    static std::mutex m;
    static std::vector<EmuTlsSymbol>* syms = nullptr;
    std::lock_guard<std::mutex> lock(m);
    if (!syms) {
        const char* path = r.module && *r.module ? r.module : "/proc/self/exe";
        syms = new std::vector<EmuTlsSymbol>(emu_tls_symbols(path));
    }
    for (const EmuTlsSymbol& s : *syms)
        if (offset >= s.offset && offset < s.offset + std::max<uint64_t>(s.size, 1))
            return s.name + " + " + std::to_string(offset - s.offset);
    return "shared offset " + std::to_string(offset);
}

// ---- reports ---------------------------------------------------------------------------------------------------
// The first reports printed (up to 64), for tests that check what a report says; emu_race_clear() empties it.
inline std::mutex& emu_race_log_mutex() {
    static std::mutex m;
    return m;
}
inline std::vector<std::string>& emu_race_log() {
    static std::vector<std::string> log;
    return log;
}
inline std::vector<std::string> emu_race_messages() {
    std::lock_guard<std::mutex> lock(emu_race_log_mutex());
    return emu_race_log();
}
inline void emu_race_clear() {
    std::lock_guard<std::mutex> lock(emu_race_log_mutex());
    emu_race_log().clear();
}
enum class EmuRaceKind { ReadAfterWrite, WriteAfterRead, WriteAfterWrite, ReadInFlight, WriteInFlight, Uninitialized };

EMU_RT __attribute__((noinline)) inline void emu_race_report(EmuRaceBlock& r, EmuRaceKind kind, size_t offset,
                                                            unsigned me, unsigned other) {
    emu_race_count.fetch_add(1);
    if (r.printed[(int)kind]++ >= 4) return;  // a missing barrier races on many bytes: a few reports say enough
    EmuHooksOff hooks_off;  // called from a hook: the report's std::string work is not the kernel's access
    EmuBlock& b = *r.b;
    const char* what = "";
    switch (kind) {
    case EmuRaceKind::ReadAfterWrite: what = "reads a byte that thread %u wrote"; break;
    case EmuRaceKind::WriteAfterRead: what = "writes a byte that thread %u read"; break;
    case EmuRaceKind::WriteAfterWrite: what = "writes a byte that thread %u wrote"; break;
    case EmuRaceKind::ReadInFlight: what = "reads a byte that thread %u's cp.async is still copying (no wait_group yet)"; break;
    case EmuRaceKind::WriteInFlight: what = "writes a byte that thread %u's cp.async is still copying (no wait_group yet)"; break;
    case EmuRaceKind::Uninitialized: what = "reads a byte no thread of this block has written%.0u"; break;
    }
    char detail[200];
    std::snprintf(detail, sizeof detail, what, other);
    bool same_interval = kind != EmuRaceKind::Uninitialized && kind != EmuRaceKind::ReadInFlight &&
                         kind != EmuRaceKind::WriteInFlight;
    char line[600];
    std::snprintf(line, sizeof line,
                  "emu race: kernel %s, block (%u,%u,%u), barrier interval %llu (%llu __syncthreads passed): "
                  "thread %u (warp %u) %s%s [%s]",
                  b.kernel_name, blockIdx.x, blockIdx.y, blockIdx.z, (unsigned long long)b.block_syncs,
                  (unsigned long long)b.block_syncs, me, me / 32,
                  detail, same_interval ? " in the same interval, with no barrier between them" : "",
                  emu_shared_name(r, offset).c_str());
    std::fprintf(stderr, "%s\n", line);
    std::lock_guard<std::mutex> lock(emu_race_log_mutex());
    if (emu_race_log().size() < 64) emu_race_log().push_back(line);
}

// ---- the check of one access ------------------------------------------------------------------------------------
EMU_RT __attribute__((noinline)) inline void emu_race_check(EmuRaceBlock& r, size_t off, size_t n, bool write) {
    // the emulator's own thread_locals (the running thread may not be set yet when it touches them)
    if (r.cells[off].ignore || !r.b->cur) return;
    unsigned me = r.b->cur->linear, w = me / 32;
    uint32_t eb = r.block_epoch, ew = r.warp_epoch[w];
    if (off + n > r.size) n = r.size - off;
    bool reported = false;  // one report per racing access, not one per byte
    auto report = [&](EmuRaceKind kind, size_t at, unsigned other) {
        if (!reported) emu_race_report(r, kind, at, me, other);
        reported = true;
    };
    for (size_t i = 0; i < n; i++) {
        EmuRaceCell& c = r.cells[off + i];
        if (c.ignore) continue;
        // a barrier between two accesses of the same block interval orders them only within one warp
        bool write_races = c.write_block == eb && c.writer != me && (c.writer / 32 != w || c.write_warp == ew);
        if (c.pending) {
            report(write ? EmuRaceKind::WriteInFlight : EmuRaceKind::ReadInFlight, off + i, c.writer);
            continue;
        }
        if (!write) {
            if (c.write_block < r.block_first)
                report(EmuRaceKind::Uninitialized, off + i, 0);
            else if (write_races)
                report(EmuRaceKind::ReadAfterWrite, off + i, c.writer);
            if (c.read_block != eb) c.read_block = eb, c.read_warps = 0;
            c.read_warps |= 1u << w;
            c.reader = (uint16_t)me;
            c.read_warp = ew;
            continue;
        }
        if (write_races) {
            report(EmuRaceKind::WriteAfterWrite, off + i, c.writer);
        } else if (c.read_block == eb) {
            bool other_warp_read = (c.read_warps & ~(1u << w)) != 0;
            bool same_warp_read = c.reader / 32 == w && c.reader != me && c.read_warp == ew;
            if (other_warp_read || same_warp_read) report(EmuRaceKind::WriteAfterRead, off + i, c.reader);
        }
        c.write_block = eb;
        c.write_warp = ew;
        c.writer = (uint16_t)me;
    }
}

// An access outside shared memory: to the access check unless it is on a fiber's stack (the kernel's own
// locals; emu_fiber.h's region holds every fiber stack, so no lookup of the running thread is needed).
EMU_RT __attribute__((noinline)) inline void emu_check_outside(EmuRaceBlock& r, const void* p, size_t n, bool write) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - emu_stacks_lo.load(std::memory_order_relaxed) < emu_stacks_bytes.load(std::memory_order_relaxed)) return;
    uint64_t epoch = 0;
    if (r.epoch) {
        epoch = r.epoch->load(std::memory_order_acquire);
        if (epoch != r.passed_epoch) {  // something was freed since these ranges passed: forget them
            for (EmuAccessPassed& e : r.passed) e = EmuAccessPassed{};
            r.passed_epoch = epoch;
        }
        for (const EmuAccessPassed& e : r.passed)
            if (a >= e.lo && a + n <= e.hi) return;
    }
    EmuHooksOff hooks_off;  // the check's own accesses are not the kernel's
    EmuAccessPassed passed;
    r.check(p, n, write, r.b->kernel_name, &passed);
    // Remembered under the epoch read before the check: a free during the check makes the next access miss.
    if (r.epoch && passed.lo <= a && a + n <= passed.hi && epoch == r.passed_epoch) {
        r.passed[r.passed_next] = passed;
        r.passed_next = (r.passed_next + 1) % EmuRaceBlock::PASSED;
    }
}

// Kernel code runs only on fibers, so an access made off a fiber is the emulator's or the host's: not checked.
EMU_RT inline void emu_race_access(const void* p, size_t n, bool write) {
    EmuFiberTop* top = emu_fiber_top();
    if (!top) return;
    EmuRaceBlock* r = static_cast<EmuTls*>(top->owner)->race_active;
    if (!r) return;
    uintptr_t off = reinterpret_cast<uintptr_t>(p) - r->lo;
    if (off < r->size) {
        if (r->race_on) emu_race_check(*r, off, n, write);
    } else if (r->check) {
        emu_check_outside(*r, p, n, write);
    }
}
// Atomics do not race with each other: only the access check sees them.
EMU_RT inline void emu_atomic_access(const volatile void* p, size_t n) {
    EmuFiberTop* top = emu_fiber_top();
    if (!top) return;
    EmuRaceBlock* r = static_cast<EmuTls*>(top->owner)->race_active;
    if (!r || !r->check) return;
    const void* a = const_cast<const void*>(p);
    if (reinterpret_cast<uintptr_t>(a) - r->lo >= r->size) emu_check_outside(*r, a, n, true);
}

// ---- the scheduler's calls (emu.h, emu_tc.h) ---------------------------------------------------------------
EMU_RT inline uint32_t emu_race_next(EmuRaceBlock& r) {
    if (r.gen >= 0xfffffff0u) {  // after four billion intervals: forget all, start again
        for (size_t i = 0; i < r.size; i++) {
            uint8_t ignore = r.cells[i].ignore;
            r.cells[i] = EmuRaceCell{};
            r.cells[i].ignore = ignore;
        }
        r.gen = 0;
    }
    return ++r.gen;
}
EMU_RT inline void emu_race_block_start(EmuBlock& b) {
    b.race = b.hooks = nullptr;
    bool race_on = emu_race_enabled();
    EmuAccessCheck check = emu_access_check.load(std::memory_order_relaxed);
    if (!race_on && !check) return;
    EmuRaceBlock* r = emu_race_shadow(b);
    if (!r) return;
    r->race_on = race_on;
    const std::atomic<uint64_t>* epoch = check ? emu_access_epoch.load(std::memory_order_relaxed) : nullptr;
    if (check != r->check || epoch != r->epoch) {  // another checker: its ranges are not this one's
        for (EmuAccessPassed& e : r->passed) e = EmuAccessPassed{};
        r->passed_epoch = epoch ? epoch->load(std::memory_order_acquire) : 0;
    }
    r->check = check;
    r->epoch = epoch;
    r->b = &b;
    b.hooks = r;
    if (!race_on) return;
    if (r->launch != b.launch_id) {
        for (unsigned& p : r->printed) p = 0;
        r->launch = b.launch_id;
    }
    uint32_t e = emu_race_next(*r);
    r->block_first = r->block_epoch = e;
    for (uint32_t& we : r->warp_epoch) we = e;
    b.race = r;
}
// Copies still in flight when their thread ended never land (emu_tc.h): the next block starts clean.
EMU_RT inline void emu_race_block_end(EmuBlock& b) {
    if (b.race)
        for (unsigned t = 0; t < b.n; t++)
            for (const EmuCopy& c : b.threads[t].copies) {
                uintptr_t off = reinterpret_cast<uintptr_t>(c.dst) - b.race->lo;
                for (size_t i = 0; i < 16 && off + i < b.race->size; i++) b.race->cells[off + i].pending = 0;
            }
    emu_race_active = nullptr;
    b.race = b.hooks = nullptr;
}
EMU_RT inline void emu_race_block_barrier(EmuBlock& b) {
    if (!b.race) return;
    uint32_t e = emu_race_next(*b.race);
    b.race->block_epoch = e;
    for (uint32_t& we : b.race->warp_epoch) we = e;
}
EMU_RT inline void emu_race_warp_barrier(EmuBlock& b, unsigned w) {
    if (b.race) b.race->warp_epoch[w] = emu_race_next(*b.race);
}
// ldmatrix reads 16 bytes at each participating lane's row address: the reads are that lane's.
EMU_RT inline void emu_race_ldmatrix_row(EmuBlock& b, const void* row) {
    EmuRaceBlock* r = b.race;
    if (!r) return;
    uintptr_t off = reinterpret_cast<uintptr_t>(row) - r->lo;
    if (off < r->size) emu_race_check(*r, off, 16, false);
}
// A cp.async of 16 bytes into `dst`: in flight until the issuing thread's wait_group completes it. Its read of
// global memory (`src`, null for a zero fill) goes to the access check: the copy is the kernel's access.
EMU_RT inline void emu_race_cp_issue(EmuBlock& b, EmuThread& th, void* dst, const void* src) {
    if (src && b.hooks && b.hooks->check) emu_check_outside(*b.hooks, src, 16, false);
    EmuRaceBlock* r = b.race;
    if (!r) return;
    uintptr_t off = reinterpret_cast<uintptr_t>(dst) - r->lo;
    if (off >= r->size) return;
    emu_race_check(*r, off, 16, true);  // the copy writes: it races with this interval's other accesses
    for (size_t i = 0; i < 16 && off + i < r->size; i++) {
        r->cells[off + i].pending = 1;
        r->cells[off + i].writer = (uint16_t)th.linear;
    }
}
EMU_RT inline void emu_race_cp_complete(EmuBlock& b, EmuThread& th, void* dst) {
    EmuRaceBlock* r = b.race;
    if (!r) return;
    uintptr_t off = reinterpret_cast<uintptr_t>(dst) - r->lo;
    if (off >= r->size) return;
    unsigned w = th.linear / 32;
    for (size_t i = 0; i < 16 && off + i < r->size; i++) {
        EmuRaceCell& c = r->cells[off + i];
        c.pending = 0;
        c.write_block = r->block_epoch;
        c.write_warp = r->warp_epoch[w];
        c.writer = (uint16_t)th.linear;
    }
}

// The line a test program prints (and counts as a failure when races were reported).
inline int emu_race_summary() {
    uint64_t n = emu_race_reports();
    std::printf("%-58s %s %llu reports (race mode %s, shared accesses %s)\n", "race check", n ? "FAIL" : "ok  ",
                (unsigned long long)n, emu_race_enabled() ? "on" : "off",
                emu_race_instrumented() ? "instrumented" : "not instrumented");
    return n != 0;
}

// ---- the entry points g++ -fsanitize=thread calls ------------------------------------------------------------
#ifdef __SANITIZE_THREAD__
#define EMU_TSAN extern "C" EMU_RT __attribute__((used)) inline
#define EMU_TSAN_ACCESS(n)                                                                                   \
    EMU_TSAN void __tsan_read##n(void* p) { emu_race_access(p, n, false); }                                  \
    EMU_TSAN void __tsan_write##n(void* p) { emu_race_access(p, n, true); }                                  \
    EMU_TSAN void __tsan_unaligned_read##n(void* p) { emu_race_access(p, n, false); }                        \
    EMU_TSAN void __tsan_unaligned_write##n(void* p) { emu_race_access(p, n, true); }                        \
    EMU_TSAN void __tsan_volatile_read##n(void* p) { emu_race_access(p, n, false); }                         \
    EMU_TSAN void __tsan_volatile_write##n(void* p) { emu_race_access(p, n, true); }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
EMU_TSAN void __tsan_read_range(void* p, unsigned long n) { emu_race_access(p, n, false); }
EMU_TSAN void __tsan_write_range(void* p, unsigned long n) { emu_race_access(p, n, true); }
EMU_TSAN void __tsan_init() {}
EMU_TSAN void __tsan_func_entry(void*) {}
EMU_TSAN void __tsan_func_exit() {}
EMU_TSAN void __tsan_vptr_update(void**, void*) {}
EMU_TSAN void __tsan_vptr_read(void**) {}
// Atomics: performed as sequentially consistent operations (stronger than asked); not race-checked (atomics
// do not race), but seen by the access check.
#define EMU_TSAN_RMW(bits, T, op)                                                                                \
    EMU_TSAN T __tsan_atomic##bits##_##op(volatile T* a, T v, int) {                                            \
        emu_atomic_access(a, sizeof(T));                                                                          \
        return __atomic_##op(a, v, __ATOMIC_SEQ_CST);                                                             \
    }
#define EMU_TSAN_ATOMIC(bits, T)                                                                                  \
    EMU_TSAN T __tsan_atomic##bits##_load(const volatile T* a, int) {                                            \
        emu_atomic_access(a, sizeof(T));                                                                          \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                              \
    }                                                                                                             \
    EMU_TSAN void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                                         \
        emu_atomic_access(a, sizeof(T));                                                                          \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                 \
    }                                                                                                             \
    EMU_TSAN T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                         \
        emu_atomic_access(a, sizeof(T));                                                                          \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                             \
    EMU_TSAN_RMW(bits, T, fetch_add)                                                                              \
    EMU_TSAN_RMW(bits, T, fetch_sub)                                                                              \
    EMU_TSAN_RMW(bits, T, fetch_and)                                                                              \
    EMU_TSAN_RMW(bits, T, fetch_or)                                                                               \
    EMU_TSAN_RMW(bits, T, fetch_xor)                                                                              \
    EMU_TSAN_RMW(bits, T, fetch_nand)                                                                             \
    EMU_TSAN int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {             \
        emu_atomic_access(a, sizeof(T));                                                                          \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                             \
    EMU_TSAN int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {               \
        emu_atomic_access(a, sizeof(T));                                                                          \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    }                                                                                                             \
    EMU_TSAN T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                   \
        emu_atomic_access(a, sizeof(T));                                                                          \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
        return c;                                                                                                 \
    }
EMU_TSAN_ATOMIC(8, char)
EMU_TSAN_ATOMIC(16, short)
EMU_TSAN_ATOMIC(32, int)
EMU_TSAN_ATOMIC(64, long)
EMU_TSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_TSAN void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#endif
