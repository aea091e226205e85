// Weak definitions of every driver entry point (entry_points.inc): the implemented ones (strong definitions in
// the other files) replace them at link time; a program that calls any other gets one stderr line naming the
// entry point and CUDA_ERROR_NOT_SUPPORTED, never a silent success. The stubs take no parameters: on x86-64
// and aarch64 the caller owns its arguments, so ignoring them is safe.
#include "state.h"
#include "entry_points.inc"

#define SIM_WEAK_STUB(name)                                                                  \
    extern "C" __attribute__((weak, visibility("default"))) CUresult name() {               \
        return sim::unsupported(#name, "this entry point is not implemented (its arguments were not read)"); \
    }
SIM_ENTRY_POINTS(SIM_WEAK_STUB)
