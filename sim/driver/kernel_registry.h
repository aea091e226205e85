// Binds the emulated kernels (kernels-ptx/cuda/*.cu compiled by g++ against kernels-ptx/emu/emu.h) to the
// driver. scripts/sim.sh generates one translation unit per module: the .cu included in a namespace of its own,
// then NCSIM_MODULE(name, source hash, NCSIM_KERNEL(namespace, entry)...) for every .entry of the module's
// PTX. Each kernel's launcher takes cuLaunchKernel's parameter pointers and calls emu.h's launch() with the
// values read as the C++ parameter types, which it learns from the kernel's own signature (template
// deduction); the same types give the parameter sizes the driver checks against the PTX's .param list, and
// which pointer parameters are reads (const T*) and which writes (T*).
#pragma once
#include "state.h"
#include <cstdlib>
#include <type_traits>
#include <utility>

namespace sim {

template <class T>
constexpr ParamKind param_kind() {
    if constexpr (std::is_pointer_v<T>)
        return std::is_const_v<std::remove_pointer_t<T>> ? ParamKind::ReadPtr : ParamKind::WritePtr;
    else
        return ParamKind::Value;
}

template <auto F, bool Resident>
struct KernelBinding;

// Resident: every block of a launch runs at once (emu.h's resident launch), for the P2P ring's kernels, whose
// blocks wait on other processes' blocks.
template <class... A, void (*F)(A...), bool Resident>
struct KernelBinding<F, Resident> {
    static int run(const char* name, void** params, const unsigned grid[3], const unsigned block[3]) {
        uint64_t races = emu_race_reports();
        // The one place the driver calls the emulator.
        launch_params(name, F, dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, params, Resident);
        return int(emu_race_reports() - races);
    }
    static RegisteredKernel make(const char* name) {
        return RegisteredKernel{name, {ParamInfo{sizeof(A), param_kind<std::remove_cv_t<A>>(), std::is_integral_v<std::remove_cv_t<A>>,
                                                 std::is_signed_v<std::remove_cv_t<A>>}...}, &run};
    }
};

// NC_SIM_PLANT_SKIP_SYNCTHREADS as a number, -1 when unset or not a number (config.cpp says what is wrong with
// it at cuInit, once; a message here would be printed once per module).
inline int planted_skip_syncthreads() {
    const char* text = std::getenv("NC_SIM_PLANT_SKIP_SYNCTHREADS");
    if (!text || !*text) return -1;
    char* end = nullptr;
    long n = std::strtol(text, &end, 10);
    return *end == '\0' && n >= 0 && n <= 1000000 ? int(n) : -1;
}

// The kernel the calling OS thread is running a block of, for the fault handler (nullptr: none).
inline const char* emu_running_kernel() { return emu_block ? emu_block->kernel_name : nullptr; }

}  // namespace sim

#define NCSIM_KERNEL(ns, entry) ::sim::KernelBinding<&ns::entry, false>::make(#entry)
#define NCSIM_RESIDENT_KERNEL(ns, entry) ::sim::KernelBinding<&ns::entry, true>::make(#entry)
// Registers the module's kernels, and the driver's bounds check as the emulator's access check (the kernels are
// compiled with -fsanitize=thread, so the emulator sees each of their global accesses: emu.h), with the count of
// frees as the epoch of the emulator's pass cache (emu_race.h). NC_SIM_PLANT_SKIP_SYNCTHREADS=N plants a missing
// __syncthreads in every kernel (emu_race.h's emu_plant_skip_syncthreads, one variable for all modules): read
// here, at load, as the emulator reads NC_SIM_RACE itself; config.cpp refuses a bad value at cuInit.
#define NCSIM_MODULE(module, hash, ...)                                                                       \
    static const bool ncsim_module_registered =                                                              \
        (emu_set_access_check(&::sim::kernel_access_check, ::sim::free_epoch()),                             \
         emu_plant_skip_syncthreads = ::sim::planted_skip_syncthreads(),                                     \
         ::sim::register_module(#module, hash, {__VA_ARGS__}, &::sim::emu_running_kernel));
