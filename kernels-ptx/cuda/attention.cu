// Causal softmax attention with GQA, flash style, in f32: forward (out and the per-row log-sum-exp) and the
// three backward kernels (delta, dk/dv, dq). No kernel holds a Tq x Tk score matrix: scores live one tile
// at a time in registers and shared memory, and the backward recomputes probabilities from the saved lse.
//
// Layouts (row-major): q, out, dout, dq (B, Tq, H, D); k, v, dk, dv (B, Tk, Hkv, D); lse, delta (B, H, Tq).
// Query row i sits at position q_pos0 + i and sees keys 0..=q_pos0 + i; query head h reads kv head
// h / (H / Hkv). head_dim D <= 128 (MAX_D), any value: tiles are padded with zeros to a multiple of 4 so the
// inner loops read float4s from shared memory. The reference is core/src/backend/cpu/attention.rs.
//
// The common pattern, used by every kernel that forms scores: a warp takes a few query rows and a tile of
// 32 keys, one key per lane. Each lane dots its key (a row of a shared tile padded to MAX_D + 4 floats, so
// the 32 lanes' float4 reads hit distinct banks) against the warp's query rows (shared, the same address for
// every lane: a broadcast). The products with the values / keys then go the other way: each lane owns 4
// consecutive columns of the head dimension (float4), and walks the 32 keys reading the tile row by row.
// Shared memory is static and under 48 KiB per block (no launch attribute needed); the figures are in
// kernels-ptx/README.md.

#include <math.h>
#include <stddef.h>
#include "block_reduce.cuh"

#define MAX_D 128         // ATTENTION_MAX_HEAD_DIM in src/lib.rs
#define KPAD (MAX_D + 4)  // row stride of tiles read one key per lane: lane j's float4 lands on banks 4j..4j+3

// Forward: 4 warps x 4 query rows = 16 rows per block, keys in tiles of 32.
// The block sizes below are mirrored by constants in src/lib.rs (the launch dims); a test compares them.
#define FWD_WARPS 4
#define FWD_BQ 16
#define FWD_ROWS (FWD_BQ / FWD_WARPS)
#define FWD_BK 32

// Delta: one warp per (batch, row, head), 8 per block.
#define DELTA_WARPS 8

// dk/dv: 32 keys per block, query rows in steps of 8 (2 per warp for the scores), 4 warps; for the
// accumulation each warp owns 8 of the keys.
#define DKV_WARPS 4
#define DKV_BK 32
#define DKV_BQ 8
#define DKV_ROWS (DKV_BQ / DKV_WARPS)
#define DKV_KEYS (DKV_BK / DKV_WARPS)

// dq: 8 query rows per block (2 per warp), keys in tiles of 32, 4 warps.
#define DQ_WARPS 4
#define DQ_BQ 8
#define DQ_ROWS (DQ_BQ / DQ_WARPS)
#define DQ_BK 32

__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

__device__ __forceinline__ void axpy4(float4& acc, float a, float4 x) {
    acc.x += a * x.x;
    acc.y += a * x.y;
    acc.z += a * x.z;
    acc.w += a * x.w;
}

__device__ __forceinline__ float4 load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

// Copies `n_rows` rows of one head (each `d` floats, consecutive rows `stride` floats apart in global
// memory) into a shared tile with row stride `ld`, padding columns d..4*d4 and rows valid_rows..n_rows with
// zeros (padded entries then add exact zeros to every dot product). Consecutive threads take consecutive
// columns, so the global reads are coalesced within a row.
__device__ void load_tile(float* dst, int ld, const float* src, size_t stride, int n_rows, int valid_rows, int d,
                          int d4) {
    int width = 4 * d4;
    for (int idx = threadIdx.x; idx < n_rows * width; idx += blockDim.x) {
        int r = idx / width;
        int c = idx - r * width;
        dst[r * ld + c] = (r < valid_rows && c < d) ? src[(size_t)r * stride + c] : 0.0f;
    }
}

// out = softmax(scale q k^T) v over the causal keys, lse = log-sum-exp of each row's scaled scores.
// Grid (ceil(tq / 16), n_head, batch), 128 threads. A block takes 16 query rows of one (batch, head) and
// streams the key/value tiles 0..(last row's position) through shared memory; each warp keeps, per row, a
// running max m, a per-lane partial sum l (the max is warp-uniform, so the lanes' partials rescale alike and
// are added once at the end) and the output accumulator for its lane's 4 columns. Tile k-th: scores (one
// key per lane), new max, rescale by exp(m_old - m_new), p = exp(s - m_new) (0 past the causal edge), then
// acc += p v with p broadcast through a per-warp shared row. Key 0 is in the first tile and visible to every
// row, so m is finite from the first tile on and no exp(-inf - -inf) can occur. Warps whose rows are all
// past tq (the tail block, and decoding with tq = 1) only help load tiles.
extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32)
    nc_attention_forward_f32(const float* q, const float* k, const float* v, float* out, float* lse, int batch,
                             int tq, int tk, int n_head, int n_kv_head, int head_dim, int q_pos0, float scale) {
    __shared__ __align__(16) float qs[FWD_BQ][MAX_D];
    __shared__ __align__(16) float ks[FWD_BK][KPAD];
    __shared__ __align__(16) float vs[FWD_BK][MAX_D];
    __shared__ __align__(16) float ps[FWD_WARPS][FWD_ROWS][FWD_BK];

    int i0 = blockIdx.x * FWD_BQ;
    int h = blockIdx.y;
    int b = blockIdx.z;
    if (i0 >= tq || b >= batch) return;
    int kvh = h / (n_head / n_kv_head);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int d4 = (head_dim + 3) / 4;
    int rows = min(FWD_BQ, tq - i0);
    int r0 = warp * FWD_ROWS;
    bool active = r0 < rows;
    size_t q_stride = (size_t)n_head * head_dim;
    size_t kv_stride = (size_t)n_kv_head * head_dim;

    load_tile(&qs[0][0], MAX_D, q + ((size_t)b * tq + i0) * q_stride + (size_t)h * head_dim, q_stride, FWD_BQ,
              rows, head_dim, d4);

    float m[FWD_ROWS], l[FWD_ROWS];
    float4 acc[FWD_ROWS];
#pragma unroll
    for (int r = 0; r < FWD_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        acc[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }

    int kend = q_pos0 + i0 + rows;  // keys visible to the block's last row (exclusive end); <= tk
    for (int j0 = 0; j0 < kend; j0 += FWD_BK) {
        int nk = min(FWD_BK, kend - j0);
        __syncthreads();  // every warp is done with the previous tile (and qs is loaded, the first time)
        size_t kv_off = ((size_t)b * tk + j0) * kv_stride + (size_t)kvh * head_dim;
        load_tile(&ks[0][0], KPAD, k + kv_off, kv_stride, FWD_BK, nk, head_dim, d4);
        load_tile(&vs[0][0], MAX_D, v + kv_off, kv_stride, FWD_BK, nk, head_dim, d4);
        __syncthreads();
        if (!active) continue;

        // Scores of this lane's key against the warp's rows.
        float s[FWD_ROWS];
#pragma unroll
        for (int r = 0; r < FWD_ROWS; r++) s[r] = 0.0f;
        for (int c = 0; c < d4; c++) {
            float4 kk = load4(&ks[lane][4 * c]);
#pragma unroll
            for (int r = 0; r < FWD_ROWS; r++) s[r] += dot4(load4(&qs[r0 + r][4 * c]), kk);
        }

        // Online softmax update, then p into the warp's shared row.
        int key = j0 + lane;
#pragma unroll
        for (int r = 0; r < FWD_ROWS; r++) {
            bool visible = key <= q_pos0 + i0 + r0 + r;
            float x = visible ? s[r] * scale : -INFINITY;
            float m_new = fmaxf(m[r], warp_max(x));
            float corr = expf(m[r] - m_new);
            float p = visible ? expf(x - m_new) : 0.0f;
            l[r] = l[r] * corr + p;
            m[r] = m_new;
            acc[r].x *= corr;
            acc[r].y *= corr;
            acc[r].z *= corr;
            acc[r].w *= corr;
            ps[warp][r][lane] = p;
        }
        __syncwarp();

        // acc += p v: this lane's 4 columns, over the tile's keys (p = 0 and v = 0 past nk).
        if (lane < d4) {
            for (int jj = 0; jj < nk; jj += 4) {
                float4 p4[FWD_ROWS];
#pragma unroll
                for (int r = 0; r < FWD_ROWS; r++) p4[r] = load4(&ps[warp][r][jj]);
                float4 v0 = load4(&vs[jj + 0][4 * lane]);
                float4 v1 = load4(&vs[jj + 1][4 * lane]);
                float4 v2 = load4(&vs[jj + 2][4 * lane]);
                float4 v3 = load4(&vs[jj + 3][4 * lane]);
#pragma unroll
                for (int r = 0; r < FWD_ROWS; r++) {
                    axpy4(acc[r], p4[r].x, v0);
                    axpy4(acc[r], p4[r].y, v1);
                    axpy4(acc[r], p4[r].z, v2);
                    axpy4(acc[r], p4[r].w, v3);
                }
            }
        }
        __syncwarp();  // ps is rewritten by the next tile
    }

    if (!active) return;
#pragma unroll
    for (int r = 0; r < FWD_ROWS; r++) {
        float l_row = warp_sum(l[r]);
        int i = i0 + r0 + r;
        if (r0 + r >= rows) continue;  // warp-uniform
        float inv = 1.0f / l_row;
        float* o = out + ((size_t)b * tq + i) * q_stride + (size_t)h * head_dim;
        float vals[4] = {acc[r].x * inv, acc[r].y * inv, acc[r].z * inv, acc[r].w * inv};
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int d = 4 * lane + c;
            if (d < head_dim) o[d] = vals[c];
        }
        if (lane == 0) lse[((size_t)b * n_head + h) * tq + i] = m[r] + logf(l_row);
    }
}

// delta (B, H, T) = rowsum(dout * out) for each (batch, row, head): the softmax backward's per-row
// correction (sum_j p_ij dp_ij = dout_i . out_i). Grid ceil(B T H / 8), 256 threads: one warp per row of D
// floats (rows taken in memory order, so a block reads 8 consecutive rows), lanes stride over the head dim
// and a warp shuffle sums.
extern "C" __global__ void __launch_bounds__(DELTA_WARPS * 32)
    nc_attention_backward_delta_f32(const float* out, const float* dout, float* delta, int batch, int t, int n_head,
                                    int head_dim) {
    size_t row = (size_t)blockIdx.x * DELTA_WARPS + (threadIdx.x >> 5);  // (b * t + i) * n_head + h
    int lane = threadIdx.x & 31;
    if (row >= (size_t)batch * t * n_head) return;  // warp-uniform
    const float* o = out + row * head_dim;
    const float* g = dout + row * head_dim;
    float sum = 0.0f;
    for (int d = lane; d < head_dim; d += 32) sum += o[d] * g[d];
    sum = warp_sum(sum);
    if (lane == 0) {
        size_t h = row % n_head;
        size_t bi = row / n_head;
        size_t i = bi % t;
        size_t bb = bi / t;
        delta[(bb * n_head + h) * t + i] = sum;
    }
}

// dk, dv (B, T, Hkv, D) for a tile of 32 keys of one (batch, kv head). Grid (ceil(t / 32), n_kv_head,
// batch), 128 threads. The block keeps its key and value tiles in shared memory and its dk/dv accumulators
// in registers (warp w owns keys 8w..8w+7, lane the 4 columns 4 lane..4 lane+3), and walks every query head
// of this kv head and every query row that can see the tile (rows >= the tile's first key) in steps of 8:
//   scores (2 rows per warp, one key per lane): p = exp(scale q.k - lse), dp = dout.v,
//   ds = p (dp - delta), both into shared tiles;
//   accumulation: dv += p^T dout, dk += ds^T q (scale applied once at the end).
// Each block writes its own rows of dk/dv once: no atomics, a fixed summation order, deterministic. The
// first key tiles see the most rows; they have the lowest block index, so they are scheduled first.
extern "C" __global__ void __launch_bounds__(DKV_WARPS * 32)
    nc_attention_backward_dkdv_f32(const float* q, const float* k, const float* v, const float* lse,
                                   const float* delta, const float* dout, float* dk, float* dv, int batch, int t,
                                   int n_head, int n_kv_head, int head_dim, float scale) {
    __shared__ __align__(16) float ks[DKV_BK][KPAD];
    __shared__ __align__(16) float vs[DKV_BK][KPAD];
    __shared__ __align__(16) float qs[DKV_BQ][MAX_D];
    __shared__ __align__(16) float dos[DKV_BQ][MAX_D];
    __shared__ __align__(16) float ps[DKV_BQ][DKV_BK];
    __shared__ __align__(16) float dss[DKV_BQ][DKV_BK];
    __shared__ float lse_s[DKV_BQ];
    __shared__ float delta_s[DKV_BQ];

    int j0 = blockIdx.x * DKV_BK;
    int kvh = blockIdx.y;
    int b = blockIdx.z;
    if (j0 >= t || b >= batch) return;
    int group = n_head / n_kv_head;
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int d4 = (head_dim + 3) / 4;
    int nk = min(DKV_BK, t - j0);
    size_t q_stride = (size_t)n_head * head_dim;
    size_t kv_stride = (size_t)n_kv_head * head_dim;
    size_t kv_off = ((size_t)b * t + j0) * kv_stride + (size_t)kvh * head_dim;

    load_tile(&ks[0][0], KPAD, k + kv_off, kv_stride, DKV_BK, nk, head_dim, d4);
    load_tile(&vs[0][0], KPAD, v + kv_off, kv_stride, DKV_BK, nk, head_dim, d4);

    float4 dk_acc[DKV_KEYS], dv_acc[DKV_KEYS];
#pragma unroll
    for (int kk = 0; kk < DKV_KEYS; kk++) {
        dk_acc[kk] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        dv_acc[kk] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }

    int key = j0 + lane;
    for (int g = 0; g < group; g++) {
        int h = kvh * group + g;
        const float* lse_h = lse + ((size_t)b * n_head + h) * t;
        const float* delta_h = delta + ((size_t)b * n_head + h) * t;
        // Rows before j0 see none of these keys; j0 is a multiple of DKV_BQ, so steps stay aligned.
        for (int i0 = j0; i0 < t; i0 += DKV_BQ) {
            int rows = min(DKV_BQ, t - i0);
            __syncthreads();  // the previous step's reads of qs/dos/ps/dss are done (ks/vs loaded, first time)
            size_t q_off = ((size_t)b * t + i0) * q_stride + (size_t)h * head_dim;
            load_tile(&qs[0][0], MAX_D, q + q_off, q_stride, DKV_BQ, rows, head_dim, d4);
            load_tile(&dos[0][0], MAX_D, dout + q_off, q_stride, DKV_BQ, rows, head_dim, d4);
            if (threadIdx.x < DKV_BQ) {
                bool ok = (int)threadIdx.x < rows;
                lse_s[threadIdx.x] = ok ? lse_h[i0 + threadIdx.x] : 0.0f;
                delta_s[threadIdx.x] = ok ? delta_h[i0 + threadIdx.x] : 0.0f;
            }
            __syncthreads();

            // Scores: warp rows r0.., lane = key.
            int r0 = warp * DKV_ROWS;
            float s[DKV_ROWS], dp[DKV_ROWS];
#pragma unroll
            for (int r = 0; r < DKV_ROWS; r++) s[r] = dp[r] = 0.0f;
#pragma unroll 1  // unrolling hoists loads next to the 64 live accumulators and spills
            for (int c = 0; c < d4; c++) {
                float4 kk = load4(&ks[lane][4 * c]);
                float4 vv = load4(&vs[lane][4 * c]);
#pragma unroll
                for (int r = 0; r < DKV_ROWS; r++) {
                    s[r] += dot4(load4(&qs[r0 + r][4 * c]), kk);
                    dp[r] += dot4(load4(&dos[r0 + r][4 * c]), vv);
                }
            }
#pragma unroll
            for (int r = 0; r < DKV_ROWS; r++) {
                int rr = r0 + r;
                bool on = rr < rows && key <= i0 + rr;  // key <= i < t also keeps key inside the sequence
                float p = on ? expf(s[r] * scale - lse_s[rr]) : 0.0f;
                ps[rr][lane] = p;
                dss[rr][lane] = p * (dp[r] - delta_s[rr]);
            }
            __syncthreads();

            // dv += p^T dout, dk += ds^T q for this warp's 8 keys and this lane's 4 columns.
            if (lane < d4) {
#pragma unroll 2  // same reason: a full unroll of the rows pushes past 128 registers
                for (int rr = 0; rr < rows; rr++) {
                    float4 oo = load4(&dos[rr][4 * lane]);
                    float4 qq = load4(&qs[rr][4 * lane]);
#pragma unroll
                    for (int kk = 0; kk < DKV_KEYS; kk += 4) {
                        float4 pa = load4(&ps[rr][warp * DKV_KEYS + kk]);
                        float4 da = load4(&dss[rr][warp * DKV_KEYS + kk]);
                        axpy4(dv_acc[kk + 0], pa.x, oo);
                        axpy4(dv_acc[kk + 1], pa.y, oo);
                        axpy4(dv_acc[kk + 2], pa.z, oo);
                        axpy4(dv_acc[kk + 3], pa.w, oo);
                        axpy4(dk_acc[kk + 0], da.x, qq);
                        axpy4(dk_acc[kk + 1], da.y, qq);
                        axpy4(dk_acc[kk + 2], da.z, qq);
                        axpy4(dk_acc[kk + 3], da.w, qq);
                    }
                }
            }
        }
    }

    if (lane >= d4) return;
#pragma unroll
    for (int kk = 0; kk < DKV_KEYS; kk++) {
        int j = warp * DKV_KEYS + kk;
        if (j >= nk) continue;
        size_t off = ((size_t)b * t + j0 + j) * kv_stride + (size_t)kvh * head_dim;
        float dkv[4] = {dk_acc[kk].x * scale, dk_acc[kk].y * scale, dk_acc[kk].z * scale, dk_acc[kk].w * scale};
        float dvv[4] = {dv_acc[kk].x, dv_acc[kk].y, dv_acc[kk].z, dv_acc[kk].w};
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int d = 4 * lane + c;
            if (d < head_dim) {
                dk[off + d] = dkv[c];
                dv[off + d] = dvv[c];
            }
        }
    }
}

// dq (B, T, H, D) = scale sum_j ds_ij k_j for 8 query rows of one (batch, head). Grid (ceil(t / 8), n_head,
// batch), 128 threads, 2 rows per warp. The rows' q, dout, lse and delta stay in shared memory; key and
// value tiles stream through it as in the forward: scores one key per lane (p = exp(scale q.k - lse),
// ds = p (dout.v - delta)), ds broadcast through a per-warp shared row, then each lane accumulates its 4
// columns of ds k. Written once per row: deterministic, no atomics.
extern "C" __global__ void __launch_bounds__(DQ_WARPS * 32)
    nc_attention_backward_dq_f32(const float* q, const float* k, const float* v, const float* lse,
                                 const float* delta, const float* dout, float* dq, int batch, int t, int n_head,
                                 int n_kv_head, int head_dim, float scale) {
    __shared__ __align__(16) float qs[DQ_BQ][MAX_D];
    __shared__ __align__(16) float dos[DQ_BQ][MAX_D];
    __shared__ __align__(16) float ks[DQ_BK][KPAD];
    __shared__ __align__(16) float vs[DQ_BK][KPAD];
    __shared__ __align__(16) float dss[DQ_WARPS][DQ_ROWS][DQ_BK];
    __shared__ float lse_s[DQ_BQ];
    __shared__ float delta_s[DQ_BQ];

    int i0 = blockIdx.x * DQ_BQ;
    int h = blockIdx.y;
    int b = blockIdx.z;
    if (i0 >= t || b >= batch) return;
    int kvh = h / (n_head / n_kv_head);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int d4 = (head_dim + 3) / 4;
    int rows = min(DQ_BQ, t - i0);
    int r0 = warp * DQ_ROWS;
    bool active = r0 < rows;
    size_t q_stride = (size_t)n_head * head_dim;
    size_t kv_stride = (size_t)n_kv_head * head_dim;
    size_t q_off = ((size_t)b * t + i0) * q_stride + (size_t)h * head_dim;

    load_tile(&qs[0][0], MAX_D, q + q_off, q_stride, DQ_BQ, rows, head_dim, d4);
    load_tile(&dos[0][0], MAX_D, dout + q_off, q_stride, DQ_BQ, rows, head_dim, d4);
    if (threadIdx.x < DQ_BQ) {
        bool ok = (int)threadIdx.x < rows;
        size_t at = ((size_t)b * n_head + h) * t + i0 + threadIdx.x;
        lse_s[threadIdx.x] = ok ? lse[at] : 0.0f;
        delta_s[threadIdx.x] = ok ? delta[at] : 0.0f;
    }

    float4 acc[DQ_ROWS];
#pragma unroll
    for (int r = 0; r < DQ_ROWS; r++) acc[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    int kend = i0 + rows;  // keys visible to the block's last row (exclusive end)
    for (int j0 = 0; j0 < kend; j0 += DQ_BK) {
        int nk = min(DQ_BK, kend - j0);
        __syncthreads();  // the previous tile is consumed (and qs/dos/lse_s/delta_s are loaded, the first time)
        size_t kv_off = ((size_t)b * t + j0) * kv_stride + (size_t)kvh * head_dim;
        load_tile(&ks[0][0], KPAD, k + kv_off, kv_stride, DQ_BK, nk, head_dim, d4);
        load_tile(&vs[0][0], KPAD, v + kv_off, kv_stride, DQ_BK, nk, head_dim, d4);
        __syncthreads();
        if (!active) continue;

        float s[DQ_ROWS], dp[DQ_ROWS];
#pragma unroll
        for (int r = 0; r < DQ_ROWS; r++) s[r] = dp[r] = 0.0f;
        for (int c = 0; c < d4; c++) {
            float4 kk = load4(&ks[lane][4 * c]);
            float4 vv = load4(&vs[lane][4 * c]);
#pragma unroll
            for (int r = 0; r < DQ_ROWS; r++) {
                s[r] += dot4(load4(&qs[r0 + r][4 * c]), kk);
                dp[r] += dot4(load4(&dos[r0 + r][4 * c]), vv);
            }
        }
        int key = j0 + lane;
#pragma unroll
        for (int r = 0; r < DQ_ROWS; r++) {
            int rr = r0 + r;
            bool on = rr < rows && key <= i0 + rr;
            float p = on ? expf(s[r] * scale - lse_s[rr]) : 0.0f;
            dss[warp][r][lane] = p * (dp[r] - delta_s[rr]);
        }
        __syncwarp();

        if (lane < d4) {
            for (int jj = 0; jj < nk; jj += 4) {
                float4 k0 = load4(&ks[jj + 0][4 * lane]);
                float4 k1 = load4(&ks[jj + 1][4 * lane]);
                float4 k2 = load4(&ks[jj + 2][4 * lane]);
                float4 k3 = load4(&ks[jj + 3][4 * lane]);
#pragma unroll
                for (int r = 0; r < DQ_ROWS; r++) {
                    float4 d4s = load4(&dss[warp][r][jj]);
                    axpy4(acc[r], d4s.x, k0);
                    axpy4(acc[r], d4s.y, k1);
                    axpy4(acc[r], d4s.z, k2);
                    axpy4(acc[r], d4s.w, k3);
                }
            }
        }
        __syncwarp();  // dss is rewritten by the next tile
    }

    if (!active || lane >= d4) return;
#pragma unroll
    for (int r = 0; r < DQ_ROWS; r++) {
        if (r0 + r >= rows) continue;
        float* o = dq + q_off + (size_t)(r0 + r) * q_stride;
        float vals[4] = {acc[r].x * scale, acc[r].y * scale, acc[r].z * scale, acc[r].w * scale};
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int d = 4 * lane + c;
            if (d < head_dim) o[d] = vals[c];
        }
    }
}
