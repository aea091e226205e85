// A CPU emulation of the CUDA subset the kernels use: one OS thread per CUDA thread, blocks in sequence,
// __syncthreads / __syncwarp as barriers, shuffles through a per-warp exchange array.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstring>
using std::max;
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __grid_constant__
struct BlockSync {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> xchg;
    std::vector<double> xchg64;
};
inline BlockSync* g_sync;
inline void __syncthreads() { g_sync->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_sync->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    g_sync->xchg[threadIdx.x] = v;
    __syncwarp();
    float r = g_sync->xchg[w * 32 + (lane ^ off)];
    __syncwarp();
    return r;
}
inline double __shfl_xor_sync(unsigned, double v, int off) {
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    g_sync->xchg64[threadIdx.x] = v;
    __syncwarp();
    double r = g_sync->xchg64[w * 32 + (lane ^ off)];
    __syncwarp();
    return r;
}
// The round-to-nearest intrinsics: one IEEE operation each (g++ in ISO C++ mode without -march contracts
// nothing, so these are exactly what the device computes).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class F, class... A>
void launch(F f, dim3 grid, dim3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    unsigned n = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                BlockSync s;
                s.block = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w < (n + 31) / 32; w++) s.warps.push_back(std::make_unique<std::barrier<>>(32));
                s.xchg.resize(n);
                s.xchg64.resize(n);
                g_sync = &s;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < n; t++)
                    ts.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        f(args...);
                        s.block->arrive_and_drop();
                        s.warps[t / 32]->arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
}
// Vector types and bit casts the bf16 kernels use (16-byte loads of 8 bf16, 8-byte stores of 4).
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
