// Checks the tensor-core emulation (emu_tc.h) against scalar references written from the PTX ISA's tables, on
// every register of all 32 lanes: mma.m16n8k16 bf16 (fragments placed by the ISA's per-element formulas,
// result compared bit for bit with one f32 rounding of the exact sum), ldmatrix x1/x2/x4 with and without
// .trans (against the mma operand layouts they are meant to produce, and against arbitrary row addresses),
// cp.async's deferred completion and zero fill, and the xor shuffle. Two warps run at once with different
// data, so a mix-up between warps' exchange slots shows. Built and run by run.sh.
#include "emu.h"
#include "emu_tc.h"
#include <random>
#include <signal.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

static int failures = 0;
static void report(const char* what, long bad, long total) {
    if (bad) failures++;
    printf("%-58s %s %ld of %ld registers differ\n", what, bad ? "FAIL" : "ok  ", bad, total);
}

static std::mt19937 rng(7);
static uint16_t rand_bf16() {
    std::normal_distribution<float> d(0, 1);
    return __float2bfloat16_rn(d(rng)).bits;
}
static float bf(uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }
static uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// ---- mma: per warp w, A[w] (16x16), B[w] (16x8), C[w] (16x8) --------------------------------------------------
static const int WARPS = 2;
static uint16_t A[WARPS][16][16], B[WARPS][16][8];
static float C[WARPS][16][8];
static float D_got[WARPS][32][4];

// The ISA's formulas, element by element: a_i (i = 0..7) sits in register i / 2, half i % 2.
static int a_row(int lane, int i) { return (lane >> 2) + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8); }
static int a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
static int b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
static int b_col(int lane, int) { return lane >> 2; }
static int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
static int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

static void mma_kernel() {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint32_t a[4], b[2];
    float c[4];
    for (int r = 0; r < 4; r++)
        a[r] = pack(A[w][a_row(lane, 2 * r)][a_col(lane, 2 * r)], A[w][a_row(lane, 2 * r + 1)][a_col(lane, 2 * r + 1)]);
    for (int r = 0; r < 2; r++)
        b[r] = pack(B[w][b_row(lane, 2 * r)][b_col(lane, 2 * r)], B[w][b_row(lane, 2 * r + 1)][b_col(lane, 2 * r + 1)]);
    for (int i = 0; i < 4; i++) c[i] = C[w][c_row(lane, i)][c_col(lane, i)];
    emu_mma_m16n8k16_bf16(c, a, b, c);  // d aliasing c, as kernels accumulate in place
    for (int i = 0; i < 4; i++) D_got[w][lane][i] = c[i];
}

static void check_mma(const char* what, float c_scale) {
    std::normal_distribution<float> d(0, 1);
    for (int w = 0; w < WARPS; w++) {
        for (auto& row : A[w])
            for (auto& x : row) x = rand_bf16();
        for (auto& row : B[w])
            for (auto& x : row) x = rand_bf16();
        for (auto& row : C[w])
            for (auto& x : row) x = c_scale * d(rng);
    }
    launch(mma_kernel, dim3{1, 1, 1}, dim3{32 * WARPS, 1, 1});
    long bad = 0;
    for (int w = 0; w < WARPS; w++)
        for (int lane = 0; lane < 32; lane++)
            for (int i = 0; i < 4; i++) {
                int r = c_row(lane, i), n = c_col(lane, i);
                // Scalar reference: exact products and sum (long double holds these sums exactly), one f32 rounding.
                long double s = C[w][r][n];
                for (int k = 0; k < 16; k++) s += (long double)bf(A[w][r][k]) * bf(B[w][k][n]);
                float want = (float)s;
                if (std::memcmp(&want, &D_got[w][lane][i], 4) != 0) bad++;
            }
    report(what, bad, WARPS * 32 * 4);
}

// ---- ldmatrix ------------------------------------------------------------------------------------------------
// The host fills these "shared" arrays and reads them back, so they are plain statics: emu.h's __shared__ is
// one copy per OS thread of its pool, which the host thread does not see.
static __align__(16) uint16_t tile[WARPS][32][64];  // rows of 128 bytes: 8 chunks of 8 bf16
static uint32_t L_got[WARPS][32][4];
static int l_row[WARPS][32], l_chunk[WARPS][32];  // the row address each lane passes
static int l_n, l_trans;

static void ldmatrix_kernel() {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint32_t r[4] = {0, 0, 0, 0};
    emu_ldmatrix(r, l_n, l_trans, &tile[w][l_row[w][lane]][8 * l_chunk[w][lane]]);
    for (int m = 0; m < 4; m++) L_got[w][lane][m] = r[m];
}

static void fill_tile() {
    for (int w = 0; w < WARPS; w++)
        for (int r = 0; r < 32; r++)
            for (int c = 0; c < 64; c++) tile[w][r][c] = rand_bf16();
}

// Arbitrary row addresses (any row, any 16-byte chunk), against the ISA's description of ldmatrix.
static void check_ldmatrix_any(int n, bool trans) {
    fill_tile();
    for (int w = 0; w < WARPS; w++)
        for (int lane = 0; lane < 32; lane++) l_row[w][lane] = rng() % 32, l_chunk[w][lane] = rng() % 8;
    l_n = n, l_trans = trans;
    launch(ldmatrix_kernel, dim3{1, 1, 1}, dim3{32 * WARPS, 1, 1});
    long bad = 0;
    for (int w = 0; w < WARPS; w++)
        for (int lane = 0; lane < 32; lane++)
            for (int m = 0; m < n; m++) {
                // matrix m: row j is the 8 bf16 at lane 8m + j's address
                auto M = [&](int j, int col) { return tile[w][l_row[w][8 * m + j]][8 * l_chunk[w][8 * m + j] + col]; };
                int g = lane / 4, t = lane % 4;
                uint32_t want = trans ? pack(M(2 * t, g), M(2 * t + 1, g)) : pack(M(g, 2 * t), M(g, 2 * t + 1));
                if (want != L_got[w][lane][m]) bad++;
            }
    char what[100];
    snprintf(what, sizeof what, "ldmatrix x%d%s, arbitrary row addresses", n, trans ? ".trans" : "");
    report(what, bad, WARPS * 32 * n);
}

// One ldmatrix of `n` matrices (.trans or not) in every warp, lane l's row address at tile row `row(l)`, 16-byte
// chunk `chunk(l)`; counts the registers that differ from the mma fragment `want(w, l, i)` (element i of warp w's
// lane l: register r holds elements 2r and 2r + 1) and reports them under `what`.
template <class Row, class Chunk, class Want>
static void check_fragment(const char* what, int n, bool trans, Row row, Chunk chunk, Want want) {
    for (int w = 0; w < WARPS; w++)
        for (int lane = 0; lane < 32; lane++) l_row[w][lane] = row(lane), l_chunk[w][lane] = chunk(lane);
    l_n = n, l_trans = trans;
    launch(ldmatrix_kernel, dim3{1, 1, 1}, dim3{32 * WARPS, 1, 1});
    long bad = 0;
    for (int w = 0; w < WARPS; w++)
        for (int lane = 0; lane < 32; lane++)
            for (int r = 0; r < n; r++)
                if (L_got[w][lane][r] != pack(want(w, lane, 2 * r), want(w, lane, 2 * r + 1))) bad++;
    report(what, bad, WARPS * 32 * n);
}

// The uses the kernels make of ldmatrix produce the mma operand layouts of the ISA's mma tables:
//   x4 over a row-major 16x16 tile (lane l: row l % 16, column 8 (l / 16)) = the A fragment;
//   x2 over B^T stored row-major (8 rows n x 16 k; lane l: row l % 8, column 8 (l / 8)) = the B fragment;
//   x2.trans over B stored row-major (16 rows k x 8 n; lane l: row l % 16) = the B fragment;
//   x1: lanes 8..31 pass addresses that must be ignored.
static void check_ldmatrix_feeds_mma() {
    fill_tile();
    // A: rows 0..15, columns 16..31 of the tile (chunks 2, 3).
    check_fragment("ldmatrix x4 of a row-major tile = mma A fragment", 4, false,
                   [](int lane) { return lane % 16; }, [](int lane) { return 2 + lane / 16; },
                   [](int w, int lane, int i) { return tile[w][a_row(lane, i)][16 + a_col(lane, i)]; });
    // B from B^T row-major: B[k][n] = tile[4 + n][8 + k].
    check_fragment("ldmatrix x2 of B^T row-major = mma B fragment", 2, false,
                   [](int lane) { return 4 + lane % 8; }, [](int lane) { return 1 + (lane / 8) % 2; },
                   [](int w, int lane, int i) { return tile[w][4 + b_col(lane, i)][8 + b_row(lane, i)]; });
    // B row-major through .trans: B[k][n] = tile[k + 3][n + 40].
    check_fragment("ldmatrix x2.trans of B row-major = mma B fragment", 2, true,
                   [](int lane) { return 3 + lane % 16; }, [](int) { return 5; },
                   [](int w, int lane, int i) { return tile[w][3 + b_row(lane, i)][40 + b_col(lane, i)]; });
    // x1: only lanes 0..7's addresses count (rows 20..27, chunk 6: the A fragment's first register of columns
    // 48..55); the other lanes pass random ones.
    check_fragment("ldmatrix x1 reads lanes 0-7's addresses only", 1, false,
                   [](int lane) { return lane < 8 ? 20 + lane : (int)(rng() % 32); },
                   [](int lane) { return lane < 8 ? 6 : (int)(rng() % 8); },
                   [](int w, int lane, int i) { return tile[w][20 + lane / 4][48 + 2 * (lane % 4) + i]; });
}

// ---- cp.async ------------------------------------------------------------------------------------------------
static __align__(16) uint16_t cp_dst[128][8];  // a plain static, as tile above
static __align__(16) uint16_t cp_src[128][8];
static int cp_bad = 0;
static void cp_async_kernel() {
    int i = threadIdx.x;
    emu_cp_async_16(cp_dst[i], cp_src[i], true);   // group 0
    emu_cp_async_commit();
    emu_cp_async_16(cp_dst[64 + i], cp_src[64 + i], i % 2 == 0);  // group 1: odd threads zero-fill
    emu_cp_async_commit();
    // Nothing has landed yet: shared memory still holds its old contents.
    if (cp_dst[i][3] != 0xAAAA || cp_dst[64 + i][3] != 0xAAAA) cp_bad++;
    emu_cp_async_wait(1);  // group 0 complete, group 1 may still be in flight
    if (std::memcmp(cp_dst[i], cp_src[i], 16) != 0 || cp_dst[64 + i][3] != 0xAAAA) cp_bad++;
    emu_cp_async_wait(0);
    bool zero = i % 2 != 0;
    for (int c = 0; c < 8; c++)
        if (cp_dst[64 + i][c] != (zero ? 0 : cp_src[64 + i][c])) cp_bad++;
}
static void check_cp_async() {
    for (auto& r : cp_src)
        for (auto& x : r) x = rand_bf16() | 1;  // never 0 nor 0xAAAA
    for (auto& r : cp_dst)
        for (auto& x : r) x = 0xAAAA;
    launch(cp_async_kernel, dim3{1, 1, 1}, dim3{64, 1, 1});
    report("cp.async: deferred to wait_group, zero fill, group order", cp_bad, 64 * 10);
}

// ---- shuffle ------------------------------------------------------------------------------------------------
static float sh_got[64][5];
static void shfl_kernel() {
    for (int b = 0; b < 5; b++) sh_got[threadIdx.x][b] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1 << b);
}
static void check_shfl() {
    launch(shfl_kernel, dim3{1, 1, 1}, dim3{64, 1, 1});
    long bad = 0;
    for (int i = 0; i < 64; i++)
        for (int b = 0; b < 5; b++)
            if (sh_got[i][b] != (float)(i ^ (1 << b))) bad++;
    report("shfl.xor 1..16, two warps", bad, 64 * 5);
}

// A shuffle in which a lane's partner uses another xor mask (lane 0 reads lane 1, which reads lane 2) is not
// emulated (emu.h's emu_shfl_exchange: values pass between partners): the run stops with a line naming the
// kernel and both masks instead of returning a wrong value. Run in a child process, since it aborts; its
// stderr comes back through a pipe.
static void shfl_mixed_masks_kernel() {
    unsigned lane = threadIdx.x % 32;
    sh_got[threadIdx.x][0] = __shfl_xor_sync(0xffffffffu, (float)lane, lane % 2 ? 3 : 1);
}
static void check_shfl_mixed_masks_stop() {
    int fds[2];
    if (pipe(fds) != 0) {
        report("shfl.xor with mixed masks stops the run (no pipe)", 1, 1);
        return;
    }
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        launch_named("shfl_mixed_masks", shfl_mixed_masks_kernel, dim3{1, 1, 1}, dim3{32, 1, 1});
        _exit(0);  // not reached when the emulator stops the run
    }
    close(fds[1]);
    std::string err;
    char buf[512];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, size_t(n));
    close(fds[0]);
    int status = 0;
    waitpid(child, &status, 0);
    bool stopped = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
    bool says = err.find("kernel shfl_mixed_masks") != std::string::npos &&
                err.find("different xor masks") != std::string::npos;
    if (!stopped || !says) printf("  child status %d, stderr: %s\n", status, err.c_str());
    report("shfl.xor with mixed masks stops the run, naming the kernel", !(stopped && says), 1);
}

int main() {
    check_mma("mma m16n8k16 bf16, C ~ N(0,1)", 1.0f);
    check_mma("mma m16n8k16 bf16, C ~ N(0,1000) (C dominates)", 1000.0f);
    check_mma("mma m16n8k16 bf16, C = 0", 0.0f);
    for (int n : {1, 2, 4})
        for (bool trans : {false, true}) check_ldmatrix_any(n, trans);
    check_ldmatrix_feeds_mma();
    check_cp_async();
    check_shfl();
    check_shfl_mixed_masks_stop();
    failures += emu_race_summary();  // run.sh runs every program in race mode
    printf("%d failures\n", failures);
    return failures != 0;
}
