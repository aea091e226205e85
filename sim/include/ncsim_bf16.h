// bf16 <-> f32 for the simulated libraries, which hold bf16 values as their uint16_t bits. Widening is exact;
// narrowing rounds to nearest even. The stand-ins differ only in what a NaN becomes, so both rules are here,
// each named for what it does and kept by the library that has it:
// - f32_to_bf16_canonical_nan: every NaN becomes the canonical bf16 NaN 0x7FFF (cuBLAS / cuBLASLt outputs,
//   sim/blas/gemm.h);
// - f32_to_bf16_quiet_nan: a NaN keeps its sign and top payload bits and is quieted (NCCL's bf16 sums,
//   sim/nccl/collectives.cpp).
#pragma once
#include <bit>
#include <cstdint>

namespace ncsim_bf16 {

inline float bf16_to_f32(uint16_t h) {
    return std::bit_cast<float>(uint32_t(h) << 16);
}

// The f32 bits of a finite or infinite value rounded to nearest even on the 16 bits dropped; overflow carries
// into the exponent (to inf) as it should.
inline uint16_t round_nearest_even(uint32_t bits) {
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

inline bool is_nan(uint32_t bits) {
    return (bits & 0x7fffffffu) > 0x7f800000u;
}

inline uint16_t f32_to_bf16_canonical_nan(float f) {
    uint32_t bits = std::bit_cast<uint32_t>(f);
    return is_nan(bits) ? uint16_t(0x7fff) : round_nearest_even(bits);
}

inline uint16_t f32_to_bf16_quiet_nan(float f) {
    uint32_t bits = std::bit_cast<uint32_t>(f);
    return is_nan(bits) ? uint16_t((bits >> 16) | 0x40) : round_nearest_even(bits);
}

}  // namespace ncsim_bf16
