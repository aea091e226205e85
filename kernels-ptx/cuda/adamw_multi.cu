// AdamW over many tensors in one launch, writing the f32 master and the bf16 working copy.
//
// The tensors travel in the launch itself: a table of up to ADAMW_MAX_TENSORS descriptors passed by value as a
// kernel parameter (1024 bytes, under the 4 KiB parameter limit), read in place (__grid_constant__: no copy to
// local memory). So a step needs no descriptor buffer on the device and no upload: the host fills the table
// (pointers, lengths, the group's per-step scalars) and launches. Block (x, y) works on tensor y, striding over
// its elements by gridDim.x blocks; blocks past a small tensor's end do nothing.
//
// Arithmetic: per element, exactly optim.cu's nc_adamw_f32 (the CPU's core/src/backend/optim_ops.rs::adamw,
// operation for operation, every multiply, add, subtract and divide a round-to-nearest intrinsic, which nvcc
// never contracts into an fma; sqrtf correctly rounded), so the master weights and moments are bit for bit the
// CPU's. Then p_bf16 = round-to-nearest-even(p) when the tensor has a working copy (p_bf16 != null).
//
// Launch: `adamw_multi_dims(max_n, count)`: grid (blocks, count), 256 threads; each thread takes 4 consecutive
// elements per step of a 64-bit grid-stride loop, with 16-byte loads and stores of p, g, m, v and an 8-byte
// store of the 4 bf16 when p, g, m, v are 16-byte aligned and p_bf16 8-byte aligned (else scalar); the last
// n % 4 elements go through a scalar loop.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

#define ADAMW_MAX_TENSORS 16

// One tensor: 64 bytes, the layout of nc_kernels::AdamwTensor (#[repr(C)]).
struct AdamwTensor {
    float* p;                // f32 master, updated in place
    const float* g;          // f32 gradient
    float* m;                // first moment
    float* v;                // second moment
    bf16* p_bf16;            // bf16 working copy, written from the new p; null: none
    unsigned long long n;    // elements
    float decay;             // 1 - lr wd (the tensor's group lr)
    float step;              // lr / (1 - beta1^t)
    float inv_bc2;           // 1 / (1 - beta2^t)
    float unused;            // padding to 64 bytes
};
struct AdamwTable {
    AdamwTensor t[ADAMW_MAX_TENSORS];
};
static_assert(sizeof(AdamwTensor) == 64, "AdamwTensor is 64 bytes (nc_kernels::AdamwTensor)");
static_assert(offsetof(AdamwTensor, n) == 40 && offsetof(AdamwTensor, decay) == 48, "AdamwTensor layout");
static_assert(sizeof(AdamwTable) == 64 * ADAMW_MAX_TENSORS, "AdamwTable is the bare array");

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }

// One element, in the CPU's order; returns the new p.
__device__ __forceinline__ float adamw_element(float p, float g, float& m, float& v, float one_minus_beta1,
                                               float one_minus_beta2, float eps, float decay, float step,
                                               float inv_bc2) {
    float mi = __fadd_rn(m, __fmul_rn(one_minus_beta1, __fsub_rn(g, m)));
    float vi = __fadd_rn(v, __fmul_rn(one_minus_beta2, __fsub_rn(__fmul_rn(g, g), v)));
    m = mi;
    v = vi;
    float denom = __fadd_rn(sqrtf(__fmul_rn(vi, inv_bc2)), eps);
    return __fsub_rn(__fmul_rn(p, decay), __fdiv_rn(__fmul_rn(step, mi), denom));
}

// (AdamwTable table [by value, 1024 bytes], i32 count, f32 beta1, f32 beta2, f32 eps): tensors 0..count of the
// table (count <= 16) take one AdamW step each.
extern "C" __global__ void nc_adamw_multi_f32(const __grid_constant__ AdamwTable table, int count, float beta1,
                                              float beta2, float eps) {
    if ((int)blockIdx.y >= count) return;
    const AdamwTensor& T = table.t[blockIdx.y];
    float one_minus_beta1 = __fsub_rn(1.0f, beta1);
    float one_minus_beta2 = __fsub_rn(1.0f, beta2);
    float* p = T.p;
    const float* g = T.g;
    float* m = T.m;
    float* v = T.v;
    bf16* pb = T.p_bf16;
    size_t n = T.n;
    float decay = T.decay, step = T.step, inv_bc2 = T.inv_bc2;
    size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t head = 0;
    if (aligned(p, 16) && aligned(g, 16) && aligned(m, 16) && aligned(v, 16) && aligned(pb, 8)) {
        head = n / 4 * 4;
        for (size_t i = start * 4; i < head; i += stride * 4) {
            float4 pv = *reinterpret_cast<const float4*>(p + i);
            float4 gv = *reinterpret_cast<const float4*>(g + i);
            float4 mv = *reinterpret_cast<const float4*>(m + i);
            float4 vv = *reinterpret_cast<const float4*>(v + i);
            pv.x = adamw_element(pv.x, gv.x, mv.x, vv.x, one_minus_beta1, one_minus_beta2, eps, decay, step, inv_bc2);
            pv.y = adamw_element(pv.y, gv.y, mv.y, vv.y, one_minus_beta1, one_minus_beta2, eps, decay, step, inv_bc2);
            pv.z = adamw_element(pv.z, gv.z, mv.z, vv.z, one_minus_beta1, one_minus_beta2, eps, decay, step, inv_bc2);
            pv.w = adamw_element(pv.w, gv.w, mv.w, vv.w, one_minus_beta1, one_minus_beta2, eps, decay, step, inv_bc2);
            *reinterpret_cast<float4*>(p + i) = pv;
            *reinterpret_cast<float4*>(m + i) = mv;
            *reinterpret_cast<float4*>(v + i) = vv;
            if (pb) *reinterpret_cast<uint2*>(pb + i) = make_uint2(pack_bf16x2(pv.x, pv.y), pack_bf16x2(pv.z, pv.w));
        }
    }
    for (size_t i = head + start; i < n; i += stride) {
        float mi = m[i], vi = v[i];
        float pi = adamw_element(p[i], g[i], mi, vi, one_minus_beta1, one_minus_beta2, eps, decay, step, inv_bc2);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (pb) pb[i] = __float2bfloat16_rn(pi);
    }
}
