// Device intrinsics the engine's own kernels (core/src/backend/cuda/kernels/) use and kernels-ptx/emu/emu.h
// does not define. scripts/sim.sh includes this inside each module's namespace, before the .cu, so a later
// definition in emu.h (global) is simply hidden here, never ambiguous. Each is one IEEE operation in round-to-
// nearest, as on the device.
#pragma once
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
