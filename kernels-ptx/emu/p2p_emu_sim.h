// The P2P ring's device primitives (kernels-ptx/cuda/p2p_ring.cu's system-scope flags, peer loads and slot
// stores) for the simulated driver, where each rank is a process of its own and a peer's data and signal
// areas are the same shared pages, mapped through CUDA IPC (sim/driver/ipc.cpp). scripts/sim.sh includes this
// before p2p_ring.cu (outside the module's namespace), and launches the module's kernels with every block
// resident at once (emu.h's resident launch), as a GPU runs the ring's few blocks: block b of one rank waits
// on block b of another process.
//
// The memory model, as PTX gives it for these accesses:
//   - flag_release (st.release.sys): a release store on a real 64-bit atomic in shared memory, after a
//     sequentially consistent fence. Every thread of the block runs as a fiber on this OS thread, and the
//     kernel calls it after a barrier, so the fence orders every thread's earlier stores before the flag (the
//     cumulativity that bar.sync + a release give on the device);
//   - flag_acquire (ld.acquire.sys): an acquire load of the same atomic; the barrier after it orders every
//     thread's later loads after it;
//   - publish / peer_load: plain stores and loads of the shared pages.
// Race mode (NC_SIM_RACE=1) makes a broken protocol fail loudly: a slot store is held back on this OS thread
// (the block) until the block's next release, and each release waits a random 0-3 ms before it lands, so a
// reader that does not wait for the flag (or trusts a flag the writer raised before its data) reads the slot's
// previous contents and the bit-exact checks fail.
#pragma once
#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <time.h>

#define NC_P2P_EMU 1
#undef __launch_bounds__
#define __launch_bounds__(...)

struct P2pHeldStore {
    void* dst;
    unsigned char bytes[16];
    unsigned n;
};
// Per OS thread, i.e. per block: a resident block keeps its OS thread for the whole launch.
struct P2pBlockState {
    P2pHeldStore held[4096];
    unsigned n_held = 0;
    const void* last_flag = nullptr;  // flag_acquire's backoff: the flag polled last and its value
    unsigned long long last_value = 0;
    unsigned same_polls = 0;
    int or_flag = 0;  // __syncthreads_or's block-wide result
    std::mt19937 rng{std::random_device{}()};
};
EMU_RT inline P2pBlockState& p2p_block_state() {
    static thread_local P2pBlockState s;
    return s;
}

// EMU_RT functions inlined into a kernel are instrumented with it, so the emulator's own bookkeeping below
// turns the hooks off (EmuHooksOff) wherever it is not the kernel's access: only a slot store made at once
// (publish outside race mode) and the kernel's own loads and stores go to the bounds check.
EMU_RT inline bool p2p_race_mode() {
    EmuHooksOff off;
    return emu_race_enabled();
}

EMU_RT inline void p2p_land_held_stores() {
    EmuHooksOff off;
    P2pBlockState& s = p2p_block_state();
    for (unsigned i = 0; i < s.n_held; i++) std::memcpy(s.held[i].dst, s.held[i].bytes, s.held[i].n);
    s.n_held = 0;
}

template <class V>
EMU_RT inline void publish(V* dst, V v) {
    static_assert(sizeof(V) <= 16, "a slot store is at most 16 bytes");
    if (!p2p_race_mode()) {
        *dst = v;
        return;
    }
    EmuHooksOff off;
    P2pBlockState& s = p2p_block_state();
    if (s.n_held == sizeof s.held / sizeof s.held[0]) p2p_land_held_stores();  // a full buffer lands early
    P2pHeldStore& h = s.held[s.n_held++];
    h.dst = dst;
    h.n = sizeof(V);
    std::memcpy(h.bytes, &v, sizeof(V));
}

EMU_RT inline void flag_release(unsigned long long* flag, unsigned long long value) {
    EmuHooksOff off;
    if (p2p_race_mode()) {
        P2pBlockState& s = p2p_block_state();
        std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 3000)(s.rng)));
        p2p_land_held_stores();
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}

// Polls back off once a flag has not moved for a while: the peers are processes sharing the CPUs with us.
EMU_RT inline unsigned long long flag_acquire(const unsigned long long* flag) {
    EmuHooksOff off;
    unsigned long long v = __atomic_load_n(flag, __ATOMIC_ACQUIRE);
    P2pBlockState& s = p2p_block_state();
    if (flag == s.last_flag && v == s.last_value) {
        if (++s.same_polls > 64) {
            struct timespec ts = {0, long(std::min(s.same_polls, 1000u)) * 1000};  // up to 1 ms
            nanosleep(&ts, nullptr);
        } else {
            std::this_thread::yield();
        }
    } else {
        s.last_flag = flag;
        s.last_value = v;
        s.same_polls = 0;
    }
    return v;
}

#include "p2p_emu_common.h"  // now_ns, peer_load (uint4 is emu.h's)

// Every thread gets whether any thread's predicate was non-zero. Three barriers: thread 0 clears the block's
// word only once every thread has read the previous result, and reads happen only once every thread has set it.
EMU_RT inline int __syncthreads_or(int pred) {
    EmuHooksOff off;
    P2pBlockState& s = p2p_block_state();
    __syncthreads();
    if (threadIdx.x == 0) s.or_flag = 0;
    __syncthreads();
    if (pred) s.or_flag = 1;
    __syncthreads();
    return s.or_flag;
}
