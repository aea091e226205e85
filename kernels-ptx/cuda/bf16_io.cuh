// Loads and stores of f32 or bf16 storage as f32 values, shared by the bf16 engine's kernels (elementwise_bf16,
// rmsnorm_bf16, rotary_qknorm, embedding, adamw_multi, newton_schulz): one element, or 8 consecutive elements
// through 16-byte accesses (the pointer 16-byte aligned). Reading a bf16 is exact (a bf16 is the high half of
// the f32 with the same bits); a bf16 store is round-to-nearest-even of the f32 value (__float2bfloat16_rn),
// as BF16_CONTRACT.md says.
//
// The including file declares `typedef __nv_bfloat16 bf16;` (after <cuda_bf16.h> and <stdint.h>) first. No
// include guard, on purpose, as block_reduce.cuh says: the emulator includes several .cu files into one
// translation unit, each in a namespace of its own, and each needs its own copy. The source stamp covers it.

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ void load8(const float* p, float v[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float v[8]) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
// Two f32 values as two bf16 in one 32-bit word, lo in the low half (the first in memory).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
__device__ __forceinline__ void store8(bf16* p, const float v[8]) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}
