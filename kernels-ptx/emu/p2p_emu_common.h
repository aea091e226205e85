// What both CPU emulations of cuda/p2p_ring.cu's device primitives define alike: p2p_emu.h (every rank a
// thread of one process, emu/p2p_emu.cpp) and p2p_emu_sim.h (every rank a process, the simulated driver).
#pragma once
#include <chrono>

// %globaltimer: nanoseconds of a steady clock. Not instrumented (emu.h's EMU_RT, written out because
// p2p_emu.h does not include emu.h): it is the emulator's code, not one of the kernel's accesses.
__attribute__((no_sanitize_thread)) inline unsigned long long now_ns() {
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// Loads of a peer's slot (ld.global.cg on the GPU): plain loads here, which the kernel orders after its
// acquire and barrier.
inline uint4 peer_load(const uint4* p) { return *p; }
inline float peer_load(const float* p) { return *p; }
inline unsigned short peer_load(const unsigned short* p) { return *p; }
