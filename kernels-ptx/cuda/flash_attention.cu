// Causal softmax attention with GQA on tensor cores, bf16 in and out, f32 softmax and accumulation: the
// FlashAttention-2 scheme (Dao, 2023) written from the published algorithm. Forward (out and the per-row
// log-sum-exp) and backward (dq with the rowsum(dout * out) pre-pass fused in, then dk/dv), for head_dim 64
// and 128, any sequence length, any n_head / n_kv_head ratio, and query rows starting at q_pos0 (KV-cache
// decoding runs the same forward with a few rows and q_pos0 > 0).
//
// Layouts (row-major, bf16 unless said): q, out, dout, dq (B, Tq, H, D); k, v, dk, dv (B, Tk, Hkv, D);
// lse, delta (B, H, Tq) f32. Query row i sits at position q_pos0 + i and sees keys 0..=q_pos0 + i; query
// head h reads kv head h / (H / Hkv). Every pointer is 16-byte aligned (rows are read in 16-byte chunks).
// The reference semantics are core/src/backend/cpu/attention.rs.
//
// Tensor-core tiles: mma.sync m16n8k16 (bf16 x bf16 -> f32). Each warp owns 16 rows of a 16 x n product;
// operands come from shared memory through ldmatrix (.trans where the tile is stored k-major, e.g. V for
// P V), and a product's f32 accumulator fragment is reused, rounded to bf16, as the A operand of the next
// product (the C and A fragment layouts line up: no shuffle, no shared round trip). Tiles travel global ->
// shared by cp.async in 16-byte chunks, with the 16-byte chunk index of each row XORed with (row % 8) so that
// the 8 row addresses of one ldmatrix hit 8 different bank groups (a plain layout would serialise them 8
// ways: rows are 128 or 256 bytes, a multiple of the 128-byte bank width).
//
// The CPU emulation (emu/emu_tc.h, run by emu/run.sh) compiles this same file with NC_EMU defined; the
// block below is the only place where the two builds differ.

#include <cuda_bf16.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

// ---- the tensor-core and async-copy instructions --------------------------------------------------------
#ifndef NC_EMU
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
// d += a b for one 16 x 8 x 16 tile (fragment layouts in emu/emu_tc.h).
__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8x8 bf16 matrices; lane l passes the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}
// 16 bytes global -> shared, asynchronously; zero-fills the 16 bytes (reading nothing) when !valid.
__device__ __forceinline__ void cp_async_16(bf16* dst, const bf16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
#undef __launch_bounds__  // emu.h's takes one argument; the kernels below pass a minimum of blocks too
#define __launch_bounds__(...)
__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    uint32_t b[2] = {b0, b1};
    emu_mma_m16n8k16_bf16(d, a, b, d);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16* row) { emu_ldmatrix(r, 4, false, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* row) { emu_ldmatrix(r, 4, true, row); }
__device__ __forceinline__ void cp_async_16(bf16* dst, const bf16* src, bool valid) {
    emu_cp_async_16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emu_cp_async_wait(N);
}
#endif

// ---- tile shapes (mirrored by FLASH_* constants in src/lib.rs; a test compares them) ----------------------
#define FLASH_WARPS 4     // every kernel: 4 warps, 128 threads
#define FLASH_THREADS 128
#define FWD_BQ 64         // forward: query rows per block (16 per warp)
#define FWD_BK 64         // forward: keys per tile
#define DQ_BQ 64          // dq: query rows per block (16 per warp)
#define DQ_BK 32          // dq: keys per tile (two tiles in flight)
#define DKV_BK 64         // dk/dv: keys per block (16 per warp)
#define DKV_BQ 16         // dk/dv: query rows per step (two steps in flight)

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of D bf16 per row.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Issues the cp.async copies of a ROWS x D tile (rows `stride` elements apart in global memory) into the
// swizzled shared tile `dst`; rows >= valid_rows are zero-filled. Consecutive threads take consecutive chunks
// of a row, so each warp reads 512 contiguous bytes.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, size_t stride, int valid_rows) {
    constexpr int CHUNKS = D / 8;
#pragma unroll
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += FLASH_THREADS) {
        int r = idx / CHUNKS;
        int c = idx % CHUNKS;
        bool valid = r < valid_rows;
        cp_async_16(dst + swizzle<D>(r, c), valid ? src + (size_t)r * stride + c * 8 : src, valid);
    }
}

// Two f32 -> one register of two bf16 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

// The A fragment of a 16 x 16 product operand taken from two 16 x 8 accumulator fragments (columns 0-7 and
// 8-15): c[0..1] are row g, c[2..3] row g + 8, at the columns 2t, 2t + 1 that a[] wants.
__device__ __forceinline__ void accumulators_to_a(uint32_t a[4], const float lo[4], const float hi[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- forward ----------------------------------------------------------------------------------------------
// out = softmax(scale q k^T) v over the causal keys; lse = log-sum-exp of each row's scaled scores.
// Grid (ceil(tq / 64), n_head, batch), 128 threads; static shared memory 2 * 64 * D * 2 bytes (32 KiB at
// D = 128). The block's 64 query rows go to registers once (warp w: rows 16w..16w+15, as mma A fragments);
// key/value tiles of 64 stream through two shared buffers in the order of the FlashAttention-2 forward:
//   wait K_j; issue V_j;  S = Q K_j^T (f32);  online softmax on S (scores in log2 units: x = s scale log2 e,
//   running max m, running sum l, the output rescaled by 2^(m_old - m_new));
//   wait V_j; issue K_j+1;  O += P V_j with P rounded to bf16 from the S registers.
// so one tile's load overlaps the other tile's product. Only tiles with a key visible to some row are
// visited (keys < q_pos0 + last row + 1); tiles wholly visible to every row of the block skip the mask, the
// (one or two) tiles crossing the diagonal apply it once, elementwise. Blocks go heaviest first (the last
// query tiles see the most keys). Each row's l is kept as per-lane partial sums (the 4 lanes of a row share
// m) and added once at the end.
template <int D>
__device__ __forceinline__ void flash_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,
                                              int tq, int tk, int n_head, int n_kv_head, int q_pos0,
                                              float scale) {
    constexpr int KSTEPS = D / 16;      // k-steps of S = Q K^T over the head dimension
    constexpr int NT = FWD_BK / 8;      // 8-key column tiles of S
    constexpr int DT = D / 8;           // 8-column tiles of O
    __shared__ __align__(128) bf16 sK[FWD_BK * D];
    __shared__ __align__(128) bf16 sV[FWD_BK * D];  // holds the Q tile until it is in registers

    int i0 = (gridDim.x - 1 - blockIdx.x) * FWD_BQ;
    int h = blockIdx.y;
    int b = blockIdx.z;
    if (i0 >= tq) return;
    int kvh = h / (n_head / n_kv_head);
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    int g = lane >> 2;
    int t = lane & 3;
    int rows = min(FWD_BQ, tq - i0);
    size_t q_stride = (size_t)n_head * D;
    size_t kv_stride = (size_t)n_kv_head * D;
    const bf16* k_head = k + (size_t)b * tk * kv_stride + (size_t)kvh * D;
    const bf16* v_head = v + (size_t)b * tk * kv_stride + (size_t)kvh * D;
    int kend = q_pos0 + i0 + rows;  // keys visible to the block's last row (exclusive); <= tk
    int n_tiles = (kend + FWD_BK - 1) / FWD_BK;

    load_tile<D, FWD_BQ>(sV, q + ((size_t)b * tq + i0) * q_stride + (size_t)h * D, q_stride, rows);
    load_tile<D, FWD_BK>(sK, k_head, kv_stride, min(FWD_BK, kend));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) ldmatrix_x4(qf[ks], sV + swizzle<D>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
    __syncthreads();  // every warp holds its Q: sV is free for V

    float o[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, log2 units
    float l_run[2] = {0.0f, 0.0f};
    const float scale_log2 = scale * LOG2E;
    int row_pos0 = q_pos0 + i0 + warp * 16 + g;  // position of this lane's row g (row g + 8: + 8)

    for (int j = 0; j < n_tiles; j++) {
        int j0 = j * FWD_BK;
        if (j > 0) {
            cp_async_wait<0>();
            __syncthreads();  // K_j has landed; every warp is done with V_j-1
        }
        load_tile<D, FWD_BK>(sV, v_head + (size_t)j0 * kv_stride, kv_stride, min(FWD_BK, kend - j0));
        cp_async_commit();

        // S = Q K_j^T: 16 rows x 64 keys per warp. One ldmatrix x4 yields the B fragments of two 8-key tiles.
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t kb[4];
                ldmatrix_x4(kb, sK + swizzle<D>(16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
                mma_bf16(s[2 * np], qf[ks], kb[0], kb[1]);
                mma_bf16(s[2 * np + 1], qf[ks], kb[2], kb[3]);
            }
        }

        // Causal mask, only where a key of the tile lies past the block's first row.
        if (j0 + FWD_BK - 1 > q_pos0 + i0) {
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = j0 + 8 * n + 2 * t + (e & 1);
                    if (key > row_pos0 + 8 * (e >> 1)) s[n][e] = -INFINITY;
                }
        }

        // Online softmax, rows g (r = 0) and g + 8 (r = 1).
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < NT; n++) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            float m_new = fmaxf(m_run[r], quad_max(mx) * scale_log2);
            // A row with nothing visible yet (only possible for padding rows) keeps m = -inf: use 0 as the
            // base so that no exp2(-inf - -inf) appears.
            float base = m_new == -INFINITY ? 0.0f : m_new;
            float corr = exp2f(m_run[r] - base);
            m_run[r] = m_new;
            l_run[r] *= corr;
#pragma unroll
            for (int n = 0; n < DT; n++) {
                o[n][2 * r] *= corr;
                o[n][2 * r + 1] *= corr;
            }
#pragma unroll
            for (int n = 0; n < NT; n++) {
                float p0 = exp2f(s[n][2 * r] * scale_log2 - base);
                float p1 = exp2f(s[n][2 * r + 1] * scale_log2 - base);
                s[n][2 * r] = p0;
                s[n][2 * r + 1] = p1;
                l_run[r] += p0 + p1;
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j has landed; every warp is done with K_j
        if (j + 1 < n_tiles) {
            load_tile<D, FWD_BK>(sK, k_head + (size_t)(j0 + FWD_BK) * kv_stride, kv_stride,
                                 min(FWD_BK, kend - j0 - FWD_BK));
            cp_async_commit();
        }

        // O += P V_j: P's k-step kk (keys 16kk..16kk+15) is S's tiles 2kk, 2kk+1; V's B fragments come from
        // the key-major tile through ldmatrix .trans, two 8-column tiles per x4.
#pragma unroll
        for (int kk = 0; kk < FWD_BK / 16; kk++) {
            uint32_t pa[4];
            accumulators_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < DT / 2; dp++) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, sV + swizzle<D>(16 * kk + (lane & 15), 2 * dp + (lane >> 4)));
                mma_bf16(o[2 * dp], pa, vb[0], vb[1]);
                mma_bf16(o[2 * dp + 1], pa, vb[2], vb[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = quad_sum(l_run[r]);
        int i = i0 + warp * 16 + g + 8 * r;
        if (i >= tq) continue;
        float inv = 1.0f / l;
        bf16* orow = out + ((size_t)b * tq + i) * q_stride + (size_t)h * D + 2 * t;
#pragma unroll
        for (int n = 0; n < DT; n++) {
            uint32_t packed = pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
            memcpy(orow + 8 * n, &packed, 4);
        }
        if (t == 0) lse[((size_t)b * n_head + h) * tq + i] = (m_run[r] + log2f(l)) * LN2;
    }
}

// (const bf16* q, const bf16* k, const bf16* v, bf16* out, f32* lse, i32 batch, i32 tq, i32 tk, i32 n_head,
// i32 n_kv_head, i32 q_pos0, f32 scale): see flash_forward. batch is the grid's z and is not otherwise read.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    nc_flash_forward_d128_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int batch,
                               int tq, int tk, int n_head, int n_kv_head, int q_pos0, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_forward<128>(q, k, v, out, lse, tq, tk, n_head, n_kv_head, q_pos0, scale);
}
extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 3)
    nc_flash_forward_d64_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int batch,
                              int tq, int tk, int n_head, int n_kv_head, int q_pos0, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_forward<64>(q, k, v, out, lse, tq, tk, n_head, n_kv_head, q_pos0, scale);
}

// ---- backward ---------------------------------------------------------------------------------------------
// Training shape only (tq = tk = t, q_pos0 = 0), as the Backend contract. Two kernels, in this order:
//   nc_flash_backward_dq_*   dq, and delta = rowsum(dout * out) (written for the next kernel);
//   nc_flash_backward_dkdv_* dk, dv.
// Both recompute P = exp(scale q k^T - lse) from the saved lse (never stored), dP = dout v^T, and
// dS = P (dP - delta); dq = scale dS k, dk = scale dS^T q, dv = P^T dout. Each output row is written once by
// one block, with a fixed order of additions: deterministic, no atomics.

// dq for 64 query rows of one (batch, head), and their delta. Grid (ceil(t / 64), n_head, batch), 128
// threads, heaviest tiles first; static shared memory 2 * 2 * 32 * D * 2 bytes (32 KiB at D = 128).
// The delta pre-pass is fused here: the block already reads its rows of dout, so it also reads out and forms
// delta before its key loop (where out's read hides behind the Q/dout copy), instead of a separate pass over
// dout. Q and dout go to registers once (as mma A fragments); key/value tiles of 32 then stream through two
// shared stages (tile j + 1 is in flight while tile j is used). Per tile, for warp w's 16 rows:
//   S = Q K^T, dP = dout V^T (f32); P = exp2(S scale log2 e - lse log2 e), masked on the diagonal tile;
//   dS = P (dP - delta); dQ += dS K, dS rounded to bf16 as the A operand and K read k-major (.trans).
template <int D>
__device__ __forceinline__ void flash_backward_dq(const bf16* q, const bf16* k, const bf16* v, const bf16* out,
                                                  const bf16* dout, const float* lse, float* delta, bf16* dq,
                                                  int t, int n_head, int n_kv_head, float scale) {
    constexpr int KSTEPS = D / 16;
    constexpr int NT = DQ_BK / 8;  // 8-key column tiles of S and dP
    constexpr int DT = D / 8;      // 8-column tiles of dQ
    constexpr int STAGE = 2 * DQ_BK * D;  // K then V
    // Two stages of K/V tiles; before the key loop the same bytes hold the Q and dout tiles (64 rows each).
    __shared__ __align__(128) bf16 smem[2 * STAGE];
    static_assert(2 * STAGE == 2 * DQ_BQ * D, "the Q/dout tiles alias the two K/V stages exactly");
    __shared__ float delta_s[DQ_BQ];

    int i0 = (gridDim.x - 1 - blockIdx.x) * DQ_BQ;
    int h = blockIdx.y;
    int b = blockIdx.z;
    if (i0 >= t) return;
    int kvh = h / (n_head / n_kv_head);
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    int g = lane >> 2;
    int tq4 = lane & 3;
    int rows = min(DQ_BQ, t - i0);
    size_t q_stride = (size_t)n_head * D;
    size_t kv_stride = (size_t)n_kv_head * D;
    size_t q_off = ((size_t)b * t + i0) * q_stride + (size_t)h * D;
    const bf16* k_head = k + (size_t)b * t * kv_stride + (size_t)kvh * D;
    const bf16* v_head = v + (size_t)b * t * kv_stride + (size_t)kvh * D;
    const float* lse_h = lse + ((size_t)b * n_head + h) * t;

    bf16* sQ = smem;
    bf16* sdO = smem + DQ_BQ * D;
    load_tile<D, DQ_BQ>(sQ, q + q_off, q_stride, rows);
    load_tile<D, DQ_BQ>(sdO, dout + q_off, q_stride, rows);
    cp_async_commit();

    // delta: thread pair (2r, 2r + 1) takes row r, one half of the columns each, 8 bf16 per 16-byte read.
    {
        int r = threadIdx.x >> 1;
        int c0 = (threadIdx.x & 1) * (D / 2);
        float acc = 0.0f;
        if (r < rows) {
            const bf16* orow = out + q_off + (size_t)r * q_stride + c0;
            const bf16* grow = dout + q_off + (size_t)r * q_stride + c0;
            for (int c = 0; c < D / 2; c += 8) {
                __nv_bfloat162 o8[4], g8[4];
                memcpy(o8, orow + c, 16);
                memcpy(g8, grow + c, 16);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 of = __bfloat1622float2(o8[e]);
                    float2 gf = __bfloat1622float2(g8[e]);
                    acc += of.x * gf.x + of.y * gf.y;
                }
            }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if ((threadIdx.x & 1) == 0) {
            delta_s[r] = acc;
            if (r < rows) delta[((size_t)b * n_head + h) * t + i0 + r] = acc;
        }
    }

    cp_async_wait<0>();
    __syncthreads();  // Q and dout tiles landed, delta_s written
    uint32_t qf[KSTEPS][4], dof[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
        int row = warp * 16 + (lane & 15);
        int chunk = 2 * ks + (lane >> 4);
        ldmatrix_x4(qf[ks], sQ + swizzle<D>(row, chunk));
        ldmatrix_x4(dof[ks], sdO + swizzle<D>(row, chunk));
    }
    // Rows g and g + 8 of the warp: lse in log2 units (+inf for rows past t, so their P is 0) and delta.
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int rr = warp * 16 + g + 8 * r;
        lse2[r] = rr < rows ? lse_h[i0 + rr] * LOG2E : INFINITY;
        dl[r] = delta_s[rr];
    }
    __syncthreads();  // every warp holds its fragments: the stages may be overwritten

    float acc[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    int row_pos0 = i0 + warp * 16 + g;
    int kend = i0 + rows;  // keys visible to the block's last row (exclusive)
    int n_tiles = (kend + DQ_BK - 1) / DQ_BK;

    load_tile<D, DQ_BK>(smem, k_head, kv_stride, min(DQ_BK, kend));
    load_tile<D, DQ_BK>(smem + DQ_BK * D, v_head, kv_stride, min(DQ_BK, kend));
    cp_async_commit();
    for (int j = 0; j < n_tiles; j++) {
        int j0 = j * DQ_BK;
        if (j + 1 < n_tiles) {
            bf16* next = smem + ((j + 1) & 1) * STAGE;
            int nk = min(DQ_BK, kend - j0 - DQ_BK);
            load_tile<D, DQ_BK>(next, k_head + (size_t)(j0 + DQ_BK) * kv_stride, kv_stride, nk);
            load_tile<D, DQ_BK>(next + DQ_BK * D, v_head + (size_t)(j0 + DQ_BK) * kv_stride, kv_stride, nk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile j has landed
        const bf16* sK = smem + (j & 1) * STAGE;
        const bf16* sV = sK + DQ_BK * D;

        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                int row = 16 * np + (lane & 7) + ((lane >> 4) << 3);
                int chunk = 2 * ks + ((lane >> 3) & 1);
                uint32_t kb[4], vb[4];
                ldmatrix_x4(kb, sK + swizzle<D>(row, chunk));
                ldmatrix_x4(vb, sV + swizzle<D>(row, chunk));
                mma_bf16(s[2 * np], qf[ks], kb[0], kb[1]);
                mma_bf16(s[2 * np + 1], qf[ks], kb[2], kb[3]);
                mma_bf16(dp[2 * np], dof[ks], vb[0], vb[1]);
                mma_bf16(dp[2 * np + 1], dof[ks], vb[2], vb[3]);
            }
        }
        bool diagonal = j0 + DQ_BK - 1 > i0;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e >> 1;
                int key = j0 + 8 * n + 2 * tq4 + (e & 1);
                float p = exp2f(s[n][e] * scale_log2 - lse2[r]);
                if (diagonal && key > row_pos0 + 8 * r) p = 0.0f;
                s[n][e] = p * (dp[n][e] - dl[r]);  // dS
            }

        // dQ += dS K: dS's k-step kk is S's tiles 2kk, 2kk + 1; K's B fragments read k-major through .trans.
#pragma unroll
        for (int kk = 0; kk < DQ_BK / 16; kk++) {
            uint32_t da[4];
            accumulators_to_a(da, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dpair = 0; dpair < DT / 2; dpair++) {
                uint32_t kb[4];
                ldmatrix_x4_trans(kb, sK + swizzle<D>(16 * kk + (lane & 15), 2 * dpair + (lane >> 4)));
                mma_bf16(acc[2 * dpair], da, kb[0], kb[1]);
                mma_bf16(acc[2 * dpair + 1], da, kb[2], kb[3]);
            }
        }
        __syncthreads();  // every warp is done with this stage before tile j + 2 is copied into it
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        int i = i0 + warp * 16 + g + 8 * r;
        if (i >= t) continue;
        bf16* row = dq + ((size_t)b * t + i) * q_stride + (size_t)h * D + 2 * tq4;
#pragma unroll
        for (int n = 0; n < DT; n++) {
            uint32_t packed = pack_bf16(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
            memcpy(row + 8 * n, &packed, 4);
        }
    }
}

// dk, dv for 64 keys of one (batch, kv head), summed over the group's query heads. Grid (ceil(t / 64),
// n_kv_head, batch), 128 threads; warp w owns keys 16w..16w+15 and their dK, dV accumulators (f32, in
// registers), and its 16 keys' K as mma A fragments (registers, loaded once). Static shared memory
// 2 * 64 * D * 2 bytes (32 KiB at D = 128): the K and V tiles; once K is in registers, K's tile holds the two
// stages of (Q, dout) tiles of 16 rows. For every query head of the group and every query step of 16 rows from the block's first key on
// (rows before it see none of these keys), with step s + 1 in flight while s is used:
//   S^T = K Q^T, dP^T = V dout^T (keys as rows, so P^T and dS^T land in the accumulator layout that the next
//   products take as A operands); P^T = exp2(S^T scale log2 e - lse log2 e) (masked where the step crosses
//   the diagonal), dS^T = P^T (dP^T - delta); dV += P^T dout, dK += dS^T Q (Q and dout read k-major, .trans).
// delta comes from nc_flash_backward_dq, which must run first.
template <int D>
__device__ __forceinline__ void flash_backward_dkdv(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                    const float* lse, const float* delta, bf16* dk, bf16* dv,
                                                    int t, int n_head, int n_kv_head, float scale) {
    constexpr int KSTEPS = D / 16;
    constexpr int DT = D / 8;
    constexpr int STAGE = 2 * DKV_BQ * D;  // Q then dout
    __shared__ __align__(128) bf16 sK[DKV_BK * D];  // K, then the two (Q, dout) stages
    __shared__ __align__(128) bf16 sV[DKV_BK * D];
    static_assert(2 * STAGE <= DKV_BK * D, "the two stages fit in K's tile");

    int j0 = blockIdx.x * DKV_BK;  // key tile 0 sees every query row: the heaviest blocks come first
    int kvh = blockIdx.y;
    int b = blockIdx.z;
    if (j0 >= t) return;
    int group = n_head / n_kv_head;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    int g = lane >> 2;
    int tq4 = lane & 3;
    int nk = min(DKV_BK, t - j0);
    size_t q_stride = (size_t)n_head * D;
    size_t kv_stride = (size_t)n_kv_head * D;
    size_t kv_off = ((size_t)b * t + j0) * kv_stride + (size_t)kvh * D;

    load_tile<D, DKV_BK>(sK, k + kv_off, kv_stride, nk);
    load_tile<D, DKV_BK>(sV, v + kv_off, kv_stride, nk);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t kf[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) ldmatrix_x4(kf[ks], sK + swizzle<D>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
    __syncthreads();  // every warp holds its K: sK becomes the stages

    float dk_acc[DT][4], dv_acc[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk_acc[n][e] = dv_acc[n][e] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    int key_pos0 = j0 + warp * 16 + g;  // this lane's key rows: key_pos0 and key_pos0 + 8
    int steps_per_head = (t - j0 + DKV_BQ - 1) / DKV_BQ;
    int n_steps = group * steps_per_head;

    // Step s: query head kvh * group + s / steps_per_head, rows j0 + 16 (s % steps_per_head) ...
    auto issue = [&](int s) {
        int h = kvh * group + s / steps_per_head;
        int i0 = j0 + (s % steps_per_head) * DKV_BQ;
        size_t q_off = ((size_t)b * t + i0) * q_stride + (size_t)h * D;
        bf16* stage = sK + (s & 1) * STAGE;
        load_tile<D, DKV_BQ>(stage, q + q_off, q_stride, min(DKV_BQ, t - i0));
        load_tile<D, DKV_BQ>(stage + DKV_BQ * D, dout + q_off, q_stride, min(DKV_BQ, t - i0));
        cp_async_commit();
    };
    issue(0);
    for (int s = 0; s < n_steps; s++) {
        if (s + 1 < n_steps) {
            issue(s + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // step s has landed
        int h = kvh * group + s / steps_per_head;
        int i0 = j0 + (s % steps_per_head) * DKV_BQ;
        const bf16* sQ = sK + (s & 1) * STAGE;
        const bf16* sdO = sQ + DKV_BQ * D;

        // S^T and dP^T: 16 keys x 16 queries per warp (two 8-query tiles).
        float st[2][4], dpt[2][4];
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
            int brow = (lane & 7) + ((lane >> 4) << 3);
            int bchunk = 2 * ks + ((lane >> 3) & 1);
            uint32_t qb[4], ob[4], va[4];
            ldmatrix_x4(qb, sQ + swizzle<D>(brow, bchunk));
            ldmatrix_x4(ob, sdO + swizzle<D>(brow, bchunk));
            ldmatrix_x4(va, sV + swizzle<D>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
            mma_bf16(st[0], kf[ks], qb[0], qb[1]);
            mma_bf16(st[1], kf[ks], qb[2], qb[3]);
            mma_bf16(dpt[0], va, ob[0], ob[1]);
            mma_bf16(dpt[1], va, ob[2], ob[3]);
        }
        // The step crosses the diagonal when a key of the block lies past its first query row.
        bool diagonal = i0 < j0 + DKV_BK - 1;
        const float* lse_h = lse + ((size_t)b * n_head + h) * t;
        const float* delta_h = delta + ((size_t)b * n_head + h) * t;
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int query = i0 + 8 * n + 2 * tq4 + c;
                bool real = query < t;
                float l2 = real ? lse_h[query] * LOG2E : INFINITY;  // rows past t: P = 0
                float dl = real ? delta_h[query] : 0.0f;
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    int e = 2 * r + c;
                    float p = exp2f(st[n][e] * scale_log2 - l2);
                    if (diagonal && key_pos0 + 8 * r > query) p = 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - dl);  // dS^T
                }
            }

        // dV += P^T dout and dK += dS^T Q: one k-step of 16 queries; B fragments k-major through .trans.
        uint32_t pa[4], da[4];
        accumulators_to_a(pa, st[0], st[1]);
        accumulators_to_a(da, dpt[0], dpt[1]);
#pragma unroll
        for (int dpair = 0; dpair < DT / 2; dpair++) {
            uint32_t ob[4], qb[4];
            ldmatrix_x4_trans(ob, sdO + swizzle<D>(lane & 15, 2 * dpair + (lane >> 4)));
            ldmatrix_x4_trans(qb, sQ + swizzle<D>(lane & 15, 2 * dpair + (lane >> 4)));
            mma_bf16(dv_acc[2 * dpair], pa, ob[0], ob[1]);
            mma_bf16(dv_acc[2 * dpair + 1], pa, ob[2], ob[3]);
            mma_bf16(dk_acc[2 * dpair], da, qb[0], qb[1]);
            mma_bf16(dk_acc[2 * dpair + 1], da, qb[2], qb[3]);
        }
        __syncthreads();  // every warp is done with this stage before step s + 2 is copied into it
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        int j = key_pos0 + 8 * r;
        if (j >= t) continue;
        size_t off = ((size_t)b * t + j) * kv_stride + (size_t)kvh * D + 2 * tq4;
#pragma unroll
        for (int n = 0; n < DT; n++) {
            uint32_t pk = pack_bf16(dk_acc[n][2 * r] * scale, dk_acc[n][2 * r + 1] * scale);
            uint32_t pv = pack_bf16(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
            memcpy(dk + off + 8 * n, &pk, 4);
            memcpy(dv + off + 8 * n, &pv, 4);
        }
    }
}

// (const bf16* q, const bf16* k, const bf16* v, const bf16* out, const bf16* dout, const f32* lse,
// f32* delta, bf16* dq, i32 batch, i32 t, i32 n_head, i32 n_kv_head, f32 scale): see flash_backward_dq.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    nc_flash_backward_dq_d128_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* out, const bf16* dout,
                                   const float* lse, float* delta, bf16* dq, int batch, int t, int n_head,
                                   int n_kv_head, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_backward_dq<128>(q, k, v, out, dout, lse, delta, dq, t, n_head, n_kv_head, scale);
}
extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 3)
    nc_flash_backward_dq_d64_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* out, const bf16* dout,
                                  const float* lse, float* delta, bf16* dq, int batch, int t, int n_head,
                                  int n_kv_head, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_backward_dq<64>(q, k, v, out, dout, lse, delta, dq, t, n_head, n_kv_head, scale);
}
// (const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const f32* lse, const f32* delta,
// bf16* dk, bf16* dv, i32 batch, i32 t, i32 n_head, i32 n_kv_head, f32 scale): see flash_backward_dkdv.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    nc_flash_backward_dkdv_d128_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                     const float* lse, const float* delta, bf16* dk, bf16* dv, int batch, int t,
                                     int n_head, int n_kv_head, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_backward_dkdv<128>(q, k, v, dout, lse, delta, dk, dv, t, n_head, n_kv_head, scale);
}
extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 3)
    nc_flash_backward_dkdv_d64_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                    const float* lse, const float* delta, bf16* dk, bf16* dv, int batch, int t,
                                    int n_head, int n_kv_head, float scale) {
    if ((int)blockIdx.z >= batch) return;
    flash_backward_dkdv<64>(q, k, v, dout, lse, delta, dk, dv, t, n_head, n_kv_head, scale);
}
