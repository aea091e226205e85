// How the simulated NCCL reaches the simulated device: the ncsim_* functions of the already-loaded simulated
// driver (sim/include/ncsim.h), found on first use. Device pointers of the simulated device are host addresses
// of this process, so a collective running on a stream worker reads and writes them directly.
#include <dlfcn.h>

#include "state.h"

namespace nccl {

// From the global scope, else from the loaded libcuda.so.1 itself: cudarc opens the driver RTLD_LOCAL, so its
// symbols are not global; RTLD_NOLOAD returns the loaded copy and never loads one.
static void* driver_symbol(const char* name) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) return f;
    static void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    return driver ? dlsym(driver, name) : nullptr;
}

const Ncsim* ncsim(const char* call) {
    static Ncsim functions;
    static bool found = false;
    static std::once_flag once;
    std::call_once(once, [] {
        functions.check_range = reinterpret_cast<decltype(functions.check_range)>(driver_symbol("ncsim_check_range"));
        functions.enqueue = reinterpret_cast<decltype(functions.enqueue)>(driver_symbol("ncsim_enqueue"));
        functions.declare_access =
            reinterpret_cast<decltype(functions.declare_access)>(driver_symbol("ncsim_declare_access"));
        functions.trace = reinterpret_cast<decltype(functions.trace)>(driver_symbol("ncsim_trace"));
        functions.current_device =
            reinterpret_cast<decltype(functions.current_device)>(driver_symbol("ncsim_current_device"));
        found = functions.check_range && functions.enqueue && functions.declare_access && functions.trace &&
                functions.current_device;
    });
    if (!found) {
        refuse(ncclUnhandledCudaError, "%s: the simulated NCCL needs the simulated driver (ncsim_* not found in the "
               "loaded libcuda.so.1); run through scripts/sim.sh, or put NVIDIA's NCCL on LD_LIBRARY_PATH for real "
               "GPUs", call);
        return nullptr;
    }
    return &functions;
}

}  // namespace nccl
