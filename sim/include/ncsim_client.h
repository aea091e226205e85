// How a stand-in library (the simulated cuBLAS and cuBLASLt, sim/blas/, and NCCL, sim/nccl/) reaches the
// simulated driver: the ncsim_* functions of ncsim.h, found in the already-loaded libcuda.so.1 on first use.
// One copy for every stand-in; each says in its own words (and error codes) when they are missing.
#pragma once
#include <dlfcn.h>

#include <mutex>

#include "ncsim.h"

struct Ncsim {
    int (*check_range)(const void*, size_t, int, const char*) = nullptr;
    int (*enqueue)(void*, void (*)(void*), void*, const char*) = nullptr;
    void (*declare_access)(const void*, size_t, int) = nullptr;
    void (*trace)(const char*, const char*) = nullptr;
    int (*current_device)(void) = nullptr;
};

// One ncsim_* function: from the global scope (a process linked against the driver, or one that opened it
// with RTLD_GLOBAL, as the tests open their fake), else from the already-loaded libcuda.so.1 itself. cudarc
// opens the driver with dlopen's default RTLD_LOCAL, so in nc its symbols are not in the global scope, and
// dlsym(RTLD_DEFAULT, ...) alone does not find them; RTLD_NOLOAD returns the loaded copy and never loads one.
inline void* ncsim_symbol(const char* name) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) return f;
    static void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    return driver ? dlsym(driver, name) : nullptr;
}

// The driver's functions, looked up once; null when the loaded libcuda.so.1 is not the simulated one (then the
// caller refuses the call, saying so).
inline const Ncsim* ncsim_functions() {
    static Ncsim functions;
    static bool found = false;
    static std::once_flag once;
    std::call_once(once, [] {
        functions.check_range = reinterpret_cast<decltype(functions.check_range)>(ncsim_symbol("ncsim_check_range"));
        functions.enqueue = reinterpret_cast<decltype(functions.enqueue)>(ncsim_symbol("ncsim_enqueue"));
        functions.declare_access =
            reinterpret_cast<decltype(functions.declare_access)>(ncsim_symbol("ncsim_declare_access"));
        functions.trace = reinterpret_cast<decltype(functions.trace)>(ncsim_symbol("ncsim_trace"));
        functions.current_device =
            reinterpret_cast<decltype(functions.current_device)>(ncsim_symbol("ncsim_current_device"));
        found = functions.check_range && functions.enqueue && functions.declare_access && functions.trace &&
                functions.current_device;
    });
    return found ? &functions : nullptr;
}
