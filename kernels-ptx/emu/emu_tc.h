// Emulation of the warp-level tensor-core instructions the bf16 kernels use (flash_attention.cu), on top of
// emu.h's fibers (one per CUDA thread, switching at barriers):
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32   (emu_mma_m16n8k16_bf16)
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 (emu_ldmatrix)
//   cp.async.cg.shared.global [16 bytes, zero fill] + cp.async.commit_group / wait_group N
// A kernel writes these as small inline device functions: the PTX under `#ifndef NC_EMU`, a call into this
// header otherwise (see the top of flash_attention.cu: the only place the two differ).
//
// Warp-synchronous execution. Every lane of a warp calls the same collective op in the same order (as the
// hardware's .sync.aligned requires). Each op writes the lane's operands into a per-warp exchange slot, waits
// on the warp barrier, then reads the other lanes' operands and computes its own result registers. Slots
// alternate between two buffers (by a per-thread count of collective ops), so one barrier per op is enough:
// a lane can only write a slot again two ops later, after the barrier of the op in between, which every lane
// reaches only once it has finished reading that slot.
//
// Fragment layouts are those of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "ldmatrix"), with g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group); a .b32 register holds two
// bf16, the lower-indexed element in the low 16 bits:
//   A (16x16, row-major) a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//                        a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B (16x8, k x n)      b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, f32)     c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//   ldmatrix: matrix m (0..3) takes its 8 row addresses from lanes 8m..8m+7 (x1 reads lanes 0-7, x2 lanes
//   0-15); register r[m] of lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix m, or with .trans the
//   elements (2(l%4), l/4) and (2(l%4)+1, l/4) of the matrix as stored (rows as addressed).
//
// What the emulated mma computes, and how that relates to the hardware:
//   exact:   every product of two bf16 values (8-bit significands) is exact in f32 (and in double here); the
//            inputs are taken bit for bit from the registers; the result is an f32 per element.
//   model:   D = round_to_nearest_even_f32( C + sum of the 16 products ), the sum formed in double. The sum
//            of 16 such products and an f32 C is exact in double unless their magnitudes span more than about
//            2^29 (then the double sum is off by < 2^-53 relative to the largest term), so this is "one f32
//            rounding of the exact result".
//   not:     the hardware does not add sequentially in IEEE f32, nor round once exactly: published measurements
//            of A100/H100 tensor cores (Fasi et al., 2021) find the products aligned to the largest exponent
//            with the bits past a fixed width dropped (truncation), then one normalisation. A device result may
//            therefore differ from this model by a few f32 ulps of the largest addend. The kernel checks use
//            tolerances set by bf16 roundings (2^-8 relative), five orders of magnitude above that.
// cp.async is emulated as what it promises, not as an immediate copy: each 16-byte copy lands at a random
// legal time between its issue and the wait_group that completes its group (see emu_cp_async_16 below), so a
// kernel that reads shared memory before waiting (or before the __syncthreads after the wait) reads stale
// data here as it may on the device.
#pragma once
#include "emu.h"
#include <cuda_bf16.h>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <deque>

// -- per-warp exchange of operands, two alternating slots (emu.h's EmuTcSlot, per block) -----------------------
EMU_RT inline EmuTcSlot& emu_tc_slot(EmuBlock& b) {
    EmuThread& th = *b.cur;
    return b.tc[(th.linear / 32) * 2 + (th.tc_ops++ & 1)];
}

// bf16 -> f32 is exact: the 16 bits are the top half of the f32.
EMU_RT inline float emu_bf16_bits(uint32_t bits16) {
    uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
EMU_RT inline float emu_bf16_lo(uint32_t w) { return emu_bf16_bits(w & 0xffffu); }
EMU_RT inline float emu_bf16_hi(uint32_t w) { return emu_bf16_bits(w >> 16); }
EMU_RT inline float emu_bf16_half(uint32_t w, int half) { return half ? emu_bf16_hi(w) : emu_bf16_lo(w); }

// Element A[row][k] of the A operand held by the warp, as the ISA distributes it (the inverse of the table
// above: row r sits with group r % 8, register bit 0 = (r >= 8), bit 1 = (k >= 8), lane (r % 8) * 4 + (k % 8) / 2,
// half k % 2).
EMU_RT inline float emu_a_element(const EmuTcSlot& s, int row, int k) {
    int lane = (row % 8) * 4 + (k % 8) / 2;
    int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return emu_bf16_half(s.a[lane][reg], k % 2);
}
// Element B[k][n] of the B operand: column n sits with group n, register k >= 8, lane n * 4 + (k % 8) / 2.
EMU_RT inline float emu_b_element(const EmuTcSlot& s, int k, int n) {
    int lane = n * 4 + (k % 8) / 2;
    return emu_bf16_half(s.b[lane][k >= 8 ? 1 : 0], k % 2);
}

// d = A B + c for one m16n8k16 tile; every lane of the warp calls it with its own fragments.
EMU_RT inline void emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    EmuBlock& blk = *tls.block;
    EmuTcSlot& s = emu_tc_slot(blk);
    int lane = tls.thread_idx.x % 32;
    for (int i = 0; i < 4; i++) s.a[lane][i] = a[i];
    for (int i = 0; i < 2; i++) s.b[lane][i] = b[i];
    s.decoded = false;
    emu_arrive_warp(blk, false);
    if (!s.decoded) {  // the warp's operands as matrices, once per operation rather than once per lane
        for (int row = 0; row < 16; row++)
            for (int k = 0; k < 16; k++) s.af[row][k] = emu_a_element(s, row, k);
        for (int n = 0; n < 8; n++)
            for (int k = 0; k < 16; k++) s.bt[n][k] = emu_b_element(s, k, n);
        s.decoded = true;
    }
    int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = g + (i >= 2 ? 8 : 0);
        int col = 2 * t + (i & 1);
        double sum = c[i];
        for (int k = 0; k < 16; k++) sum += (double)s.af[row][k] * (double)s.bt[col][k];
        out[i] = (float)sum;  // one round to nearest even
    }
    for (int i = 0; i < 4; i++) d[i] = out[i];  // after reading c: d may alias c
}

// ldmatrix .x<n_mat> (1, 2 or 4) [.trans]: `row_addr` is this lane's row address (16-byte aligned shared
// memory), r[0..n_mat) receive the fragments.
EMU_RT inline void emu_ldmatrix(uint32_t* r, int n_mat, bool trans, const void* row_addr) {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    EmuBlock& blk = *tls.block;
    EmuTcSlot& s = emu_tc_slot(blk);
    int lane = tls.thread_idx.x % 32;
    s.addr[lane] = row_addr;
    if (lane < 8 * n_mat) emu_race_ldmatrix_row(blk, row_addr);
    emu_arrive_warp(blk, false);
    for (int m = 0; m < n_mat; m++)
        for (int j = 0; j < 8; j++)
            assert((reinterpret_cast<uintptr_t>(s.addr[8 * m + j]) & 15) == 0 && "ldmatrix row address not 16-byte aligned");
    int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < n_mat; m++) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* row = static_cast<const uint16_t*>(s.addr[8 * m + g]);
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = static_cast<const uint16_t*>(s.addr[8 * m + 2 * t])[g];
            hi = static_cast<const uint16_t*>(s.addr[8 * m + 2 * t + 1])[g];
        }
        r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

// -- cp.async: per-thread lists of 16-byte copies in flight (emu.h's EmuCopy) ---------------------------------
// Each copy gets a random landing time when it is issued: with probability 1/2 at the wait_group that
// completes its group, otherwise after 0..15 more barriers of the issuing thread (emu.h's emu_cp_tick). Both
// are legal on the device, so a kernel that reads a tile before waiting for it, or copies into a buffer other
// warps still read, reads wrong data here; the race mode (emu_race.h) also reports the read itself.
EMU_RT inline void emu_cp_async_16(void* dst_shared, const void* src_global, bool valid) {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    assert((reinterpret_cast<uintptr_t>(dst_shared) & 15) == 0 && "cp.async destination not 16-byte aligned");
    assert((!valid || (reinterpret_cast<uintptr_t>(src_global) & 15) == 0) && "cp.async source not 16-byte aligned");
    EmuBlock& blk = *tls.block;
    EmuThread& th = *blk.cur;
    uint64_t r = emu_rand(blk);
    uint32_t delay = (r & 1) ? UINT32_MAX : uint32_t((r >> 1) % 16);
    th.copies.push_back({dst_shared, valid ? src_global : nullptr, th.open_group, delay, false});
    emu_race_cp_issue(blk, th, dst_shared, valid ? src_global : nullptr);
}
EMU_RT inline void emu_cp_async_commit() { emu_here().block->cur->open_group++; }  // no std code: no EmuHooksOff
// Completes the oldest committed groups until at most `pending` remain in flight: their copies that have not
// landed yet land now.
EMU_RT inline void emu_cp_async_wait(int pending) {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    EmuBlock& blk = *tls.block;
    EmuThread& th = *blk.cur;
    if (emu_planted_skip(th.cp_wait_calls, emu_plant_skip_cp_wait)) return;
    if ((uint64_t)pending >= th.open_group) return;
    uint64_t complete = th.open_group - (uint64_t)pending;  // groups < complete are done after this wait
    if (complete <= th.waited_group) return;
    th.waited_group = complete;
    EmuCopy* c = th.copies.data();
    size_t n = th.copies.size(), kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (c[i].group < complete) {
            emu_cp_land(c[i]);
            emu_race_cp_complete(blk, th, c[i].dst);
        } else {
            c[kept++] = c[i];
        }
    }
    th.copies.resize(kept);
}
// A thread that ends with copies in flight: the emulator drops them (they never land), so a kernel that
// relies on them reads stale shared memory.
