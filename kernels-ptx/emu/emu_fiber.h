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

// One fiber stack: reserved, not committed (pages appear as the fiber touches them), with a guard page below
// so that an overflow faults instead of writing into the next stack.
struct EmuStack {
    static constexpr size_t SIZE = 256 * 1024;
    static constexpr size_t GUARD = 4096;
    char* base = nullptr;  // the guard page; the usable stack is [base + GUARD, base + SIZE)
    EmuStack() {
        void* m = mmap(nullptr, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "emu: cannot map a %zu-byte fiber stack\n", SIZE);
            std::abort();
        }
        base = static_cast<char*>(m);
        mprotect(base, GUARD, PROT_NONE);
    }
    EmuStack(const EmuStack&) = delete;
    EmuStack& operator=(const EmuStack&) = delete;
    ~EmuStack() { munmap(base, SIZE); }
    EMU_FIBER_RT char* lo() const { return base + GUARD; }
    EMU_FIBER_RT size_t size() const { return SIZE - GUARD; }
};
