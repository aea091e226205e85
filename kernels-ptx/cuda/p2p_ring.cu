// The peer-to-peer ring between the GPUs of one node (UNVERIFIED: compiled, run only in the CPU emulation
// emu/p2p_emu.cpp, never on a GPU). Every rank owns two buffers that its peers have opened through CUDA IPC:
// a data area (ring slots, then a one-shot region) and a signal area (u64 flags, one 64-byte line each).
//
// The flag protocol is the shared-memory ring's (comm/src/shm_flags.rs), per block ("channel"):
// - send slice k: wait until the next rank's CONSUMED >= k + 1 - slots (acquire), write slot k mod slots of
//   this rank's data area with ordinary stores, barrier, then thread 0 stores SENT = k + 1 (st.release.sys);
// - receive slice k: wait until the previous rank's SENT >= k + 1 (ld.acquire.sys), barrier, read its slot,
//   barrier, then thread 0 stores CONSUMED = k + 1 (st.release.sys): the reads are done before the sender
//   may overwrite the slot.
// The release after a barrier covers every thread's stores (bar.sync orders them before thread 0's release,
// and a release is cumulative); the acquire before a barrier covers every thread's later loads. The counters
// are epochs over the ring's whole life (the host passes the first sequence number of each launch): they
// only grow, so no flag is reset under a reader and a reused slot cannot pass for its previous contents.
//
// What each block does comes from a plan table computed on the host by comm/src/schedule.rs (`ring_plan`,
// the very plan the shared-memory ring runs; comm/src/p2p_plan.rs encodes it): two u64 per operation,
// word 0 = first element, word 1 = element count | step << 32 | (1 << 48 if a receive). Every block runs
// every operation on its own part of the slice (parts of ceil(len / blocks) elements rounded up to 8, so
// every part of an aligned slice is 16-byte aligned) with its own flags and slots, so blocks never wait on
// each other.
//
// Why few blocks (the host launches P2P_DEFAULT_BLOCKS = 8, at most P2P_MAX_BLOCKS): one block of 512
// threads with 16-byte accesses keeps enough loads in flight to stream one link's share; more blocks
// than that only add contention on NVLink and take SMs from the backward pass the collective overlaps with.
// __launch_bounds__(P2P_THREADS, 1): one block per SM is all a ring wants; asking ptxas for more (its default)
// made it cap registers so low that the one-shot kernels spilled on sm_80.
//
// Sums: reduce-scatter adds the incoming partial to this rank's own term, in f32, so chunk c is summed over
// ranks c+1, c+2, ..., c (schedule::sum_order), the shared-memory ring's order; partials travel as f32 for
// bf16 too and the owner rounds once. The one-shot all-reduce (small messages) has every rank read every
// rank's copy and add them in rank order 0, 1, ..., n-1: the same bits on every rank.
//
// A wait that outlasts `timeout_ns` (a dead or stuck peer) stores a code in this rank's error word and ends
// the kernel; the host reads the word after the launch.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

// load1 / store1 / load8 / store8 of f32 or bf16 storage, aligned16 (the bf16 kernels' one copy).
#include "bf16_io.cuh"

#define P2P_THREADS 512
#define P2P_MAX_BLOCKS 16
// u64s between two flags: one 64-byte line each, so a poller never shares a line with another flag.
#define P2P_FLAG_STRIDE 8
#define P2P_SENT 0
#define P2P_CONSUMED 1
#define P2P_POSTED 2
#define P2P_DONE 3
#define P2P_FLAGS_PER_BLOCK 4
// The error word follows the flags of the last block; the signal area is P2P_SIGNAL_U64S u64s.
#define P2P_ERROR_WORD (P2P_MAX_BLOCKS * P2P_FLAGS_PER_BLOCK * P2P_FLAG_STRIDE)
#define P2P_SIGNAL_U64S (P2P_ERROR_WORD + P2P_FLAG_STRIDE)
#define P2P_OP_RECV (1ull << 48)
// A part of a slice is a multiple of this many elements (8 bf16 or 2 x 4 f32 = one or two 16-byte vectors).
#define P2P_PART_ALIGN 8

#ifndef NC_P2P_EMU
// Flag accesses at system scope: peers are other processes, possibly on other GPUs.
__device__ __forceinline__ void flag_release(u64* flag, u64 value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}
__device__ __forceinline__ u64 flag_acquire(const u64* flag) {
    u64 value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
    return value;
}
__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// A store a peer will read after our release (the emulation holds these back until the release).
template <class V>
__device__ __forceinline__ void publish(V* dst, V v) {
    *dst = v;
}
// A load of a peer's slot: cached in L2 only (.cg), since nothing is read twice and L1 is not coherent with
// the peer's writes.
__device__ __forceinline__ uint4 peer_load(const uint4* p) { return __ldcg(p); }
__device__ __forceinline__ float peer_load(const float* p) { return __ldcg(p); }
__device__ __forceinline__ unsigned short peer_load(const unsigned short* p) { return __ldcg(p); }
#endif
__device__ __forceinline__ float peer_load1(const float* p) { return peer_load(p); }
__device__ __forceinline__ float peer_load1(const bf16* p) {
    return __uint_as_float((unsigned)peer_load(reinterpret_cast<const unsigned short*>(p)) << 16);
}

// Eight f32 of a slot this rank publishes / of a peer's slot.
__device__ __forceinline__ void publish8(float* slot, const float v[8]) {
    publish(reinterpret_cast<uint4*>(slot), make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]),
                                                       __float_as_uint(v[2]), __float_as_uint(v[3])));
    publish(reinterpret_cast<uint4*>(slot) + 1, make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]),
                                                           __float_as_uint(v[6]), __float_as_uint(v[7])));
}
__device__ __forceinline__ void peer8(const float* slot, float v[8]) {
    uint4 a = peer_load(reinterpret_cast<const uint4*>(slot));
    uint4 b = peer_load(reinterpret_cast<const uint4*>(slot) + 1);
    v[0] = __uint_as_float(a.x), v[1] = __uint_as_float(a.y), v[2] = __uint_as_float(a.z);
    v[3] = __uint_as_float(a.w), v[4] = __uint_as_float(b.x), v[5] = __uint_as_float(b.y);
    v[6] = __uint_as_float(b.z), v[7] = __uint_as_float(b.w);
}

__device__ __forceinline__ void peer8(const bf16* slot, float v[8]) {
    uint4 u = peer_load(reinterpret_cast<const uint4*>(slot));
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ u64* flag_of(u64* signal, int block, int which) {
    return signal + ((size_t)block * P2P_FLAGS_PER_BLOCK + which) * P2P_FLAG_STRIDE;
}

// Thread 0 waits until `*flag` >= target; every thread returns whether the wait succeeded. On a timeout,
// stores (1 << 63) | peer << 8 | which in this rank's error word.
__device__ bool wait_flag(const u64* flag, u64 target, u64 deadline, u64* my_signal, int peer, int which) {
    int failed = 0;
    if (threadIdx.x == 0) {
        while (flag_acquire(flag) < target) {
            if (now_ns() > deadline) {
                failed = 1;
                my_signal[P2P_ERROR_WORD] = (1ull << 63) | ((u64)peer << 8) | (u64)which;
                break;
            }
        }
    }
    // The barrier after thread 0's acquire: every thread's later loads see what the peer released.
    return __syncthreads_or(failed) == 0;
}

// This block's part [lo, hi) of an operation's `len` elements.
__device__ __forceinline__ void block_part(u64 len, u64* lo, u64* hi) {
    u64 per = (len + gridDim.x - 1) / gridDim.x;
    per = (per + P2P_PART_ALIGN - 1) / P2P_PART_ALIGN * P2P_PART_ALIGN;
    *lo = min((u64)blockIdx.x * per, len);
    *hi = min(*lo + per, len);
}

// A block's end of the ring's links, one slice at a time: slot k of block b is data + (b * slots + k % slots) *
// slot_bytes of its owner's data area. A receive waits for the previous rank's SENT flag, reads its slot and
// releases this rank's CONSUMED flag; a send waits (once the slots have wrapped) for the next rank's CONSUMED
// flag, fills this rank's slot and releases SENT. The flags count slices: after slice k, k + 1.
struct RingLink {
    int b;
    u64 deadline;
    char* my_data;
    const char* prev_data;
    u64* my_signal;
    const u64* prev_signal;
    const u64* next_signal;
    u64 send_seq, recv_seq;
    int slots;
    u64 slot_bytes;
    int prev_rank, next_rank;

    // Waits until the previous rank has sent its next slice, then points `slot` at it; false after a timeout
    // (the error word says why: the kernel ends).
    __device__ __forceinline__ bool wait_recv(const char** slot) {
        const u64 k = recv_seq++;
        if (!wait_flag(flag_of((u64*)prev_signal, b, P2P_SENT), k + 1, deadline, my_signal, prev_rank, P2P_SENT))
            return false;
        *slot = prev_data + ((u64)b * slots + k % slots) * slot_bytes;
        return true;
    }
    // After the block has read the slice: the previous rank may reuse its slot.
    __device__ __forceinline__ void release_recv() {
        __syncthreads();
        if (threadIdx.x == 0) flag_release(flag_of(my_signal, b, P2P_CONSUMED), recv_seq);
    }
    // Waits until the next rank has read what this rank's next slot held, then points `slot` at it; false after
    // a timeout.
    __device__ __forceinline__ bool wait_send(char** slot) {
        const u64 k = send_seq++;
        if (k >= (u64)slots &&
            !wait_flag(flag_of((u64*)next_signal, b, P2P_CONSUMED), k + 1 - slots, deadline, my_signal, next_rank,
                       P2P_CONSUMED))
            return false;
        *slot = my_data + ((u64)b * slots + k % slots) * slot_bytes;
        return true;
    }
    // After the block has filled the slot: the next rank may read it.
    __device__ __forceinline__ void release_send() {
        __syncthreads();
        if (threadIdx.x == 0) flag_release(flag_of(my_signal, b, P2P_SENT), send_seq);
    }
};

// ---- reduce-scatter

// Send: slot <- this rank's partial of elements [start, start + count) (its own input at step 0, the f32
// partial it built at the previous step after that). Receive: the partial from the previous rank's slot plus
// this rank's input, into `work`, or rounded into `out` at the last step (the chunk this rank owns).
template <class T>
__device__ void rs_send(const T* in, const float* work, float* slot, u64 start, u64 count, bool first_step) {
    const u64 groups = count / 8;
    const bool vec = aligned16(in + start) && aligned16(work + start);
    u64 done = 0;
    if (vec) {
        for (u64 g = threadIdx.x; g < groups; g += blockDim.x) {
            float v[8];
            if (first_step) load8(in + start + 8 * g, v);
            else load8(work + start + 8 * g, v);
            publish8(slot + 8 * g, v);
        }
        done = groups * 8;
    }
    for (u64 i = done + threadIdx.x; i < count; i += blockDim.x) {
        float v = first_step ? load1(in + start + i) : work[start + i];
        publish(slot + i, v);
    }
}

template <class T>
__device__ void rs_recv(const T* in, float* work, T* out, const float* peer_slot, u64 start, u64 count,
                        bool last_step) {
    const u64 groups = count / 8;
    const bool vec = aligned16(in + start) && aligned16(work + start) && aligned16(out + start);
    u64 done = 0;
    if (vec) {
        for (u64 g = threadIdx.x; g < groups; g += blockDim.x) {
            float theirs[8], mine[8];
            peer8(peer_slot + 8 * g, theirs);
            load8(in + start + 8 * g, mine);
            for (int k = 0; k < 8; k++) mine[k] = theirs[k] + mine[k];
            if (last_step) store8(out + start + 8 * g, mine);
            else store8(work + start + 8 * g, mine);
        }
        done = groups * 8;
    }
    for (u64 i = done + threadIdx.x; i < count; i += blockDim.x) {
        float v = peer_load1(peer_slot + i) + load1(in + start + i);
        if (last_step) store1(out + start + i, v);
        else work[start + i] = v;
    }
}

// One rank's reduce-scatter, one launch: grid = blocks (<= P2P_MAX_BLOCKS), P2P_THREADS threads. `in`, `work`
// and `out` may alias (f32 runs in place with all three the caller's buffer; bf16 reads `in`, keeps partials
// in the f32 `work` of the same length and writes its owned chunk, rounded once, to `out`). A slot (`RingLink`)
// holds slot_bytes / 4 f32.
template <class T>
__device__ void ring_reduce_scatter(const u64* plan, int n_ops, int last_step, const T* in, float* work, T* out,
                                    char* my_data, const char* prev_data, u64* my_signal, const u64* prev_signal,
                                    const u64* next_signal, u64 send_seq, u64 recv_seq, int slots, u64 slot_bytes,
                                    int prev_rank, int next_rank, u64 timeout_ns) {
    RingLink link = {(int)blockIdx.x, now_ns() + timeout_ns, my_data, prev_data, my_signal, prev_signal, next_signal,
                     send_seq, recv_seq, slots, slot_bytes, prev_rank, next_rank};
    for (int i = 0; i < n_ops; i++) {
        const u64 start = plan[2 * i], word = plan[2 * i + 1];
        const u64 len = word & 0xffffffffull;
        const int step = (int)((word >> 32) & 0xffff);
        u64 lo, hi;
        block_part(len, &lo, &hi);
        if (word & P2P_OP_RECV) {
            const char* peer_slot;
            if (!link.wait_recv(&peer_slot)) return;
            rs_recv(in, work, out, (const float*)peer_slot, start + lo, hi - lo, step == last_step);
            link.release_recv();
        } else {
            char* slot;
            if (!link.wait_send(&slot)) return;
            rs_send(in, work, (float*)slot, start + lo, hi - lo, step == 0);
            link.release_send();
        }
    }
}

// Parameters (all kernels of this file: p = pointer, u = u64, i = i32):
// (p plan, i n_ops, i last_step, p in, p work, p out, p my_data, p prev_data, p my_signal, p prev_signal,
//  p next_signal, u send_seq, u recv_seq, i slots, u slot_bytes, i prev_rank, i next_rank, u timeout_ns)
extern "C" __global__ void __launch_bounds__(P2P_THREADS, 1)
    nc_p2p_reduce_scatter_f32(const u64* plan, int n_ops, int last_step, const float* in, float* work, float* out,
                              char* my_data, const char* prev_data, u64* my_signal, const u64* prev_signal,
                              const u64* next_signal, u64 send_seq, u64 recv_seq, int slots, u64 slot_bytes,
                              int prev_rank, int next_rank, u64 timeout_ns) {
    ring_reduce_scatter(plan, n_ops, last_step, in, work, out, my_data, prev_data, my_signal, prev_signal,
                        next_signal, send_seq, recv_seq, slots, slot_bytes, prev_rank, next_rank, timeout_ns);
}
extern "C" __global__ void __launch_bounds__(P2P_THREADS, 1)
    nc_p2p_reduce_scatter_bf16(const u64* plan, int n_ops, int last_step, const bf16* in, float* work, bf16* out,
                               char* my_data, const char* prev_data, u64* my_signal, const u64* prev_signal,
                               const u64* next_signal, u64 send_seq, u64 recv_seq, int slots, u64 slot_bytes,
                               int prev_rank, int next_rank, u64 timeout_ns) {
    ring_reduce_scatter(plan, n_ops, last_step, in, work, out, my_data, prev_data, my_signal, prev_signal,
                        next_signal, send_seq, recv_seq, slots, slot_bytes, prev_rank, next_rank, timeout_ns);
}

// ---- all-gather: bytes move unchanged (elem_bytes 4 for f32, 2 for bf16); a send copies elements of `buf`
// into this rank's slot, a receive copies the previous rank's slot into `buf`. `bytes` is even.

__device__ void copy_bytes(unsigned char* dst, const unsigned char* src, u64 bytes, bool to_slot) {
    const bool vec = aligned16(dst) && aligned16(src);
    u64 done = 0;
    if (vec) {
        const u64 vecs = bytes / 16;
        for (u64 v = threadIdx.x; v < vecs; v += blockDim.x) {
            if (to_slot) publish(reinterpret_cast<uint4*>(dst) + v, reinterpret_cast<const uint4*>(src)[v]);
            else reinterpret_cast<uint4*>(dst)[v] = peer_load(reinterpret_cast<const uint4*>(src) + v);
        }
        done = vecs * 16;
    }
    unsigned short* dst2 = reinterpret_cast<unsigned short*>(dst);
    const unsigned short* src2 = reinterpret_cast<const unsigned short*>(src);
    for (u64 i = done / 2 + threadIdx.x; i < bytes / 2; i += blockDim.x) {
        if (to_slot) publish(dst2 + i, src2[i]);
        else dst2[i] = peer_load(src2 + i);
    }
}

// Parameters: (p plan, i n_ops, p buf, i elem_bytes, p my_data, p prev_data, p my_signal, p prev_signal,
//  p next_signal, u send_seq, u recv_seq, i slots, u slot_bytes, i prev_rank, i next_rank, u timeout_ns)
extern "C" __global__ void __launch_bounds__(P2P_THREADS, 1)
    nc_p2p_all_gather(const u64* plan, int n_ops, unsigned char* buf, int elem_bytes, char* my_data,
                      const char* prev_data, u64* my_signal, const u64* prev_signal, const u64* next_signal,
                      u64 send_seq, u64 recv_seq, int slots, u64 slot_bytes, int prev_rank, int next_rank,
                      u64 timeout_ns) {
    RingLink link = {(int)blockIdx.x, now_ns() + timeout_ns, my_data, prev_data, my_signal, prev_signal, next_signal,
                     send_seq, recv_seq, slots, slot_bytes, prev_rank, next_rank};
    for (int i = 0; i < n_ops; i++) {
        const u64 start = plan[2 * i], word = plan[2 * i + 1];
        u64 lo, hi;
        block_part(word & 0xffffffffull, &lo, &hi);
        unsigned char* mine = buf + (start + lo) * elem_bytes;
        const u64 bytes = (hi - lo) * elem_bytes;
        if (word & P2P_OP_RECV) {
            const char* peer_slot;
            if (!link.wait_recv(&peer_slot)) return;
            copy_bytes(mine, (const unsigned char*)peer_slot, bytes, false);
            link.release_recv();
        } else {
            char* slot;
            if (!link.wait_send(&slot)) return;
            copy_bytes((unsigned char*)slot, mine, bytes, true);
            link.release_send();
        }
    }
}

// ---- one-shot all-reduce (small messages): each block posts its part of `in` to its region of this rank's
// one-shot area, waits for every rank's post of the same epoch, and sums every rank's copy in rank order.
// Epoch e (1, 2, ... over the ring's life): before overwriting its region a rank waits until every peer's
// DONE >= e - 1 (they finished reading its previous post); after reading it stores DONE = e.
// `peers`: n_ranks one-shot area pointers (this rank's included), then n_ranks signal area pointers.
// Block b's region starts at b * region_bytes of each area.
template <class T>
__device__ void one_shot(const T* in, T* out, u64 n, const u64* peers, int n_ranks, int rank, u64 epoch,
                         u64 region_bytes, u64 timeout_ns) {
    const int b = blockIdx.x;
    const u64 deadline = now_ns() + timeout_ns;
    u64* my_signal = (u64*)peers[n_ranks + rank];
    u64 lo, hi;
    block_part(n, &lo, &hi);
    for (int p = 0; p < n_ranks; p++) {
        if (p == rank) continue;
        if (!wait_flag(flag_of((u64*)peers[n_ranks + p], b, P2P_DONE), epoch - 1, deadline, my_signal, p, P2P_DONE))
            return;
    }
    T* mine = (T*)((char*)peers[rank] + (u64)b * region_bytes);
    const bool vec_in = aligned16(in + lo);
    u64 done = 0;
    if (vec_in) {
        const u64 vecs = (hi - lo) * sizeof(T) / 16;
        for (u64 v = threadIdx.x; v < vecs; v += blockDim.x)
            publish(reinterpret_cast<uint4*>(mine) + v, reinterpret_cast<const uint4*>(in + lo)[v]);
        done = vecs * 16 / sizeof(T);
    }
    for (u64 i = done + threadIdx.x; i < hi - lo; i += blockDim.x) publish(mine + i, in[lo + i]);
    __syncthreads();
    if (threadIdx.x == 0) flag_release(flag_of(my_signal, b, P2P_POSTED), epoch);
    for (int p = 0; p < n_ranks; p++) {
        if (p == rank) continue;
        if (!wait_flag(flag_of((u64*)peers[n_ranks + p], b, P2P_POSTED), epoch, deadline, my_signal, p, P2P_POSTED))
            return;
    }
    const u64 count = hi - lo;
    // This rank's own term comes from `in` (the same thread reads in[i] before it writes out[i], so `in` may
    // be `out`), the peers' from their regions.
    const bool vec = vec_in && aligned16(out + lo);
    done = 0;
    if (vec) {
        for (u64 g = threadIdx.x; g < count / 8; g += blockDim.x) {
            float acc[8], term[8];
            for (int p = 0; p < n_ranks; p++) {
                const T* theirs = (const T*)((const char*)peers[p] + (u64)b * region_bytes) + 8 * g;
                if (p == rank) load8(in + lo + 8 * g, term);
                else peer8(theirs, term);
                for (int k = 0; k < 8; k++) acc[k] = p == 0 ? term[k] : acc[k] + term[k];
            }
            store8(out + lo + 8 * g, acc);
        }
        done = count / 8 * 8;
    }
    for (u64 i = done + threadIdx.x; i < count; i += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < n_ranks; p++) {
            const T* theirs = (const T*)((const char*)peers[p] + (u64)b * region_bytes);
            float term = p == rank ? load1(in + lo + i) : peer_load1(theirs + i);
            acc = p == 0 ? term : acc + term;
        }
        store1(out + lo + i, acc);
    }
    __syncthreads();
    if (threadIdx.x == 0) flag_release(flag_of(my_signal, b, P2P_DONE), epoch);
}

// Parameters: (p in, p out, u n, p peers, i n_ranks, i rank, u epoch, u region_bytes, u timeout_ns)
extern "C" __global__ void __launch_bounds__(P2P_THREADS, 1)
    nc_p2p_one_shot_f32(const float* in, float* out, u64 n, const u64* peers, int n_ranks, int rank, u64 epoch,
                        u64 region_bytes, u64 timeout_ns) {
    one_shot(in, out, n, peers, n_ranks, rank, epoch, region_bytes, timeout_ns);
}
extern "C" __global__ void __launch_bounds__(P2P_THREADS, 1)
    nc_p2p_one_shot_bf16(const bf16* in, bf16* out, u64 n, const u64* peers, int n_ranks, int rank, u64 epoch,
                         u64 region_bytes, u64 timeout_ns) {
    one_shot(in, out, n, peers, n_ranks, rank, epoch, region_bytes, timeout_ns);
}
