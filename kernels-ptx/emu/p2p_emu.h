// The CUDA subset cuda/p2p_ring.cu uses, on the CPU, with every rank's blocks running AT ONCE (emu.h cannot:
// its threads are fibers that switch only at barriers, and rank r's block spins on rank r-1's flags). One OS
// thread per CUDA thread; __syncthreads is a barrier of the block's threads; a rank's "device memory" is host
// memory its peers read directly, as they would through CUDA IPC.
//
// A weak memory model, just enough to catch a broken protocol: a slot store (`publish`) is held back in the
// storing thread's buffer; a barrier hands the block's buffered stores to the block; a release
// (`flag_release`) writes all of them to memory before the flag. So a flag raised without a release, a
// release before the barrier, or a reader that trusts a flag of an earlier epoch reads stale data: the
// emulation publishes late whatever was not released. Planting a bug: `g_plant_no_release` turns every
// release into a relaxed store whose data lands only 50 ms after the kernel ends.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define NC_P2P_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
// The same for every rank of one emulated launch.
inline dim3 blockDim, gridDim;

struct __align__(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct __align__(16) float4 { float x, y, z, w; };  // bf16_io.cuh's 16-byte f32 accesses
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
using std::min;
#include "p2p_emu_common.h"  // now_ns, peer_load (after uint4)

// A store held back until a release: where, and up to 16 bytes.
struct PendingStore {
    void* dst;
    unsigned char bytes[16];
    unsigned n;
};

struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::mutex m;
    std::vector<PendingStore> fenced;  // stores of any thread of the block made before a barrier
    std::atomic<int> any[3] = {0, 0, 0};  // __syncthreads_or, rotating so a slot is cleared two calls ahead
};
inline thread_local EmuBlock* t_block;
inline thread_local std::vector<PendingStore> t_pending;
inline thread_local unsigned t_or_calls;

// Planted bug: releases do not order the data before the flag.
inline std::atomic<bool> g_plant_no_release{false};

template <class V>
inline void publish(V* dst, V v) {
    static_assert(sizeof(V) <= 16);
    PendingStore s{dst, {}, sizeof(V)};
    std::memcpy(s.bytes, &v, sizeof(V));
    t_pending.push_back(s);
}
inline void flush_stores() {
    std::lock_guard<std::mutex> g(t_block->m);
    for (auto* list : {&t_block->fenced, &t_pending}) {
        for (const PendingStore& s : *list) std::memcpy(s.dst, s.bytes, s.n);
        list->clear();
    }
}
inline void hand_to_block() {
    std::lock_guard<std::mutex> g(t_block->m);
    t_block->fenced.insert(t_block->fenced.end(), t_pending.begin(), t_pending.end());
    t_pending.clear();
}
inline void __syncthreads() {
    hand_to_block();
    t_block->bar->arrive_and_wait();
}
inline int __syncthreads_or(int pred) {
    unsigned k = t_or_calls++ % 3;
    hand_to_block();
    if (pred) t_block->any[k].fetch_or(1);
    t_block->bar->arrive_and_wait();
    int result = t_block->any[k].load();
    // Slot k+2 was last read two calls ago (every thread is past that), and is next set one call from now
    // (no thread can get there before thread 0 clears it, since that call's barrier waits for thread 0).
    if (threadIdx.x == 0) t_block->any[(k + 2) % 3].store(0);
    return result;
}

inline void flag_release(unsigned long long* flag, unsigned long long value) {
    if (g_plant_no_release.load()) {
        // A relaxed store: the flag goes out now, the data only when the kernel ends (launch_ranks).
        std::atomic_ref<unsigned long long>(*flag).store(value);
        return;
    }
    flush_stores();
    std::atomic_ref<unsigned long long>(*flag).store(value);
}
inline unsigned long long flag_acquire(const unsigned long long* flag) {
    unsigned long long v = std::atomic_ref<unsigned long long>(*const_cast<unsigned long long*>(flag)).load();
    std::this_thread::yield();  // emulated ranks outnumber the cores
    return v;
}

// Runs `body(rank)` as `ranks` concurrent launches of `blocks` x `threads`. `late_rank` (or -1) starts
// `late_ms` after the others: a slow peer, so a reader that does not really wait reads stale data.
inline void launch_ranks(int ranks, unsigned blocks, unsigned threads, int late_rank, int late_ms,
                         const std::function<void(int)>& body) {
    gridDim = {blocks, 1, 1};
    blockDim = {threads, 1, 1};
    std::vector<std::unique_ptr<EmuBlock>> all;
    std::vector<std::thread> ts;
    for (int r = 0; r < ranks; r++)
        for (unsigned b = 0; b < blocks; b++) {
            all.push_back(std::make_unique<EmuBlock>());
            EmuBlock* blk = all.back().get();
            blk->bar = std::make_unique<std::barrier<>>(threads);
            for (unsigned t = 0; t < threads; t++)
                ts.emplace_back([=, &body] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {b, 0, 0};
                    t_block = blk;
                    t_or_calls = 0;
                    t_pending.clear();
                    if (r == late_rank) std::this_thread::sleep_for(std::chrono::milliseconds(late_ms));
                    body(r);
                    // The end of a kernel makes everything visible; with the planted bug, late enough that a
                    // reader trusting the unreleased flag reads before the data lands.
                    if (g_plant_no_release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
                    flush_stores();
                    blk->bar->arrive_and_drop();
                });
        }
    for (auto& t : ts) t.join();
}
