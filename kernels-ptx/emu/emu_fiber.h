// User-level contexts (fibers) for emu.h: each CUDA thread of a block runs on its own small stack, and a
// thread gives the CPU back only at a barrier. A switch saves the callee-saved registers and the stack
// pointer on the old stack and loads them from the new one: about 10 ns, against a futex round trip per
// barrier and per thread with one OS thread per CUDA thread. On x86-64 the switch is the hand-written one
// below; elsewhere ucontext (glibc's swapcontext makes a sigprocmask system call per switch: correct, slower).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <mutex>
#include <vector>
#include <sys/mman.h>

// Not instrumented when compiled with -fsanitize=thread (emu_race.h's hooks call into these).
#define EMU_FIBER_RT __attribute__((no_sanitize_thread))

#if defined(__x86_64__) && !defined(NC_EMU_UCONTEXT)
// emu_fiber_switch(save, to): pushes rbp rbx r12-r15, stores rsp in *save, loads rsp = to, pops the same six
// registers from there and returns into whatever the new stack's return slot holds. MXCSR and the x87
// control word are not switched: every fiber of a worker shares the worker's floating-point environment.
// Weak and hidden: the header may be compiled into several objects of one library.
asm(R"(
    .text
    .p2align 4
    .weak emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch
)");
extern "C" void emu_fiber_switch(void** save_sp, void* to_sp);

struct EmuContext {
    void* sp = nullptr;
};
// Prepares `ctx` so that switching to it calls entry() on the stack [lo, lo + size). entry must never return.
EMU_FIBER_RT inline void emu_context_make(EmuContext& ctx, char* lo, size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
    void** p = reinterpret_cast<void**>(top);
    *--p = nullptr;                             // entry's own return address: it never returns
    *--p = reinterpret_cast<void*>(entry);      // popped by emu_fiber_switch's ret; entry then sees rsp % 16 == 8,
    for (int i = 0; i < 6; i++) *--p = nullptr;  // as after a call; the six saved registers start as zero
    ctx.sp = p;
}
EMU_FIBER_RT inline void emu_context_switch(EmuContext& from, EmuContext& to) { emu_fiber_switch(&from.sp, to.sp); }
#else
#include <ucontext.h>
struct EmuContext {
    ucontext_t uc;
};
EMU_FIBER_RT inline void emu_context_make(EmuContext& ctx, char* lo, size_t size, void (*entry)()) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = lo;
    ctx.uc.uc_stack.ss_size = size;
    ctx.uc.uc_link = nullptr;
    makecontext(&ctx.uc, entry, 0);
}
EMU_FIBER_RT inline void emu_context_switch(EmuContext& from, EmuContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- fiber stacks, and finding the running fiber's state from its stack ---------------------------------------
// Every fiber stack is EmuStack::SIZE bytes at a SIZE-aligned address inside one region reserved once, and holds
// a small header (EmuFiberTop) at its top. Code running on a fiber finds its state from its own stack pointer:
// inside the region, round up to the stack's top, read the header. Why not a thread_local: in the simulated
// driver the kernels live in a dlopen'ed library, where every thread_local access is a call to __tls_get_addr,
// and the scheduler and the access hooks made several per barrier and per load (perf: ~16% of a training step).
// Outside the region (an OS thread's own stack) the lookup says "not on a fiber". The header (and so the stack
// below it) sits 64 bytes lower per stack, over 64 steps: at the same offset of SIZE-aligned stacks, every
// header would fall into one cache set, and a block's 256 fibers would evict each other's at every barrier.
struct EmuFiberTop {
    void* owner;  // what the fiber's user put there (emu.h: the OS thread's EmuTls)
};

struct EmuStackRegion {
    static constexpr size_t STACKS = 65536;  // 16 GiB of address space, none of it committed until used
    std::mutex m;
    std::vector<char*> free_list;  // stacks given back (their pages released), reused first
    size_t next = 0;  // stacks handed out from the region so far
};
// A plain load of 4 or 8 bytes that -fsanitize=thread does not instrument (inline asm): kernel code reads the
// emulator's own state (threadIdx, blockDim, ...) through it, since after inlining g++ instruments even an
// uninstrumented function's loads, and each would be a call to the access hook (emu_race.h).
template <class T>
__attribute__((no_sanitize_thread, always_inline)) inline T emu_quiet_load(const T* p) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte loads");
#if defined(__x86_64__)
    T v;
    asm("mov %1, %0" : "=r"(v) : "m"(*p));
    return v;
#else
    return *p;
#endif
}

// The region's first byte and size; written once (the first stack), before any fiber can run.
inline std::atomic<uintptr_t> emu_stacks_lo{0};
inline std::atomic<size_t> emu_stacks_bytes{0};

// The header of the stack holding address `a` (inside the region).
EMU_FIBER_RT inline EmuFiberTop* emu_stack_top(uintptr_t a);

struct EmuStack {
    static constexpr size_t SIZE = 256 * 1024;  // a power of two: the top is found by rounding up
    static constexpr size_t GUARD = 4096;
    static constexpr size_t LINE = 64, COLORS = 64;  // the header is 1..COLORS lines below the top
    char* base = nullptr;  // the guard page; the usable stack is [base + GUARD, top())
    EmuStack();
    EmuStack(const EmuStack&) = delete;
    EmuStack& operator=(const EmuStack&) = delete;
    ~EmuStack();
    EMU_FIBER_RT char* lo() const { return base + GUARD; }
    EMU_FIBER_RT size_t size() const { return reinterpret_cast<char*>(top()) - lo(); }
    EMU_FIBER_RT EmuFiberTop* top() const { return emu_stack_top(reinterpret_cast<uintptr_t>(base)); }
};

inline EmuStackRegion& emu_stack_region() {
    static EmuStackRegion* region = [] {
        size_t bytes = EmuStackRegion::STACKS * EmuStack::SIZE;
        // PROT_NONE and MAP_NORESERVE: address space only; a stack's pages are made usable when it is taken.
        void* m = mmap(nullptr, bytes + EmuStack::SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "emu: cannot reserve %zu bytes of address space for fiber stacks\n", bytes);
            std::abort();
        }
        uintptr_t lo = (reinterpret_cast<uintptr_t>(m) + EmuStack::SIZE - 1) & ~(uintptr_t)(EmuStack::SIZE - 1);
        emu_stacks_bytes.store(bytes);
        emu_stacks_lo.store(lo);
        return new EmuStackRegion;  // never destroyed: fibers may outlive static destruction
    }();
    return *region;
}

inline EmuStack::EmuStack() {
    EmuStackRegion& r = emu_stack_region();
    std::lock_guard<std::mutex> lock(r.m);
    if (!r.free_list.empty()) {
        base = r.free_list.back();
        r.free_list.pop_back();
        return;
    }
    if (r.next == EmuStackRegion::STACKS) {
        std::fprintf(stderr, "emu: more than %zu fiber stacks at once\n", EmuStackRegion::STACKS);
        std::abort();
    }
    base = reinterpret_cast<char*>(emu_stacks_lo.load() + r.next++ * SIZE);
    // The guard page below stays PROT_NONE, so an overflow faults instead of writing into the next stack.
    if (mprotect(base + GUARD, SIZE - GUARD, PROT_READ | PROT_WRITE) != 0) {
        std::fprintf(stderr, "emu: cannot map a %zu-byte fiber stack\n", SIZE);
        std::abort();
    }
}

inline EmuStack::~EmuStack() {
    madvise(base + GUARD, SIZE - GUARD, MADV_DONTNEED);  // its pages go back; the addresses stay usable
    EmuStackRegion& r = emu_stack_region();
    std::lock_guard<std::mutex> lock(r.m);
    r.free_list.push_back(base);
}

EMU_FIBER_RT __attribute__((always_inline)) inline EmuFiberTop* emu_stack_top(uintptr_t a) {
    static_assert(sizeof(std::atomic<uintptr_t>) == sizeof(uintptr_t), "emu_fiber_top reads the atomics plainly");
    uintptr_t index = (a - emu_quiet_load(reinterpret_cast<const uintptr_t*>(&emu_stacks_lo))) / EmuStack::SIZE;
    uintptr_t end = (a | (EmuStack::SIZE - 1)) + 1;
    return reinterpret_cast<EmuFiberTop*>(end - (1 + index % EmuStack::COLORS) * EmuStack::LINE);
}

// The header of the fiber stack the caller runs on, or null when it runs on an OS thread's own stack.
EMU_FIBER_RT __attribute__((always_inline)) inline EmuFiberTop* emu_fiber_top() {
#if defined(__x86_64__)
    uintptr_t sp;
    asm("movq %%rsp, %0" : "=r"(sp));
#else
    uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
    // Plain loads of values written once before any fiber ran (the region's creation happens-before the fiber).
    uintptr_t off = sp - emu_quiet_load(reinterpret_cast<const uintptr_t*>(&emu_stacks_lo));
    if (off >= emu_quiet_load(reinterpret_cast<const size_t*>(&emu_stacks_bytes))) return nullptr;
    return emu_stack_top(sp);
}
