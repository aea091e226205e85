// The private contract with the other stand-ins (sim/include/ncsim.h): they reach the driver's memory checks,
// streams and trace through these functions, found with dlsym in the already-loaded driver.
#include "../include/ncsim.h"
#include "state.h"

namespace sim {
static thread_local std::vector<Access> t_declared;  // accesses declared for the next ncsim_enqueue
}

using namespace sim;

SIM_API int ncsim_check_range(const void* ptr, size_t bytes, int, const char* what) {
    check_range(uint64_t(ptr), bytes, what ? what : "ncsim_check_range");
    return 0;
}

SIM_API void ncsim_declare_access(const void* ptr, size_t bytes, int is_write) {
    t_declared.push_back({uint64_t(ptr), bytes, is_write != 0});
}

SIM_API int ncsim_enqueue(void* stream, void (*fn)(void*), void* ctx, const char* what) {
    std::vector<Access> accesses;
    accesses.swap(t_declared);
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    for (const Access& a : accesses) check_range(a.start, a.bytes, what ? what : "ncsim_enqueue");
    return enqueue("ncsim_enqueue", static_cast<CUstream>(stream), what ? what : "stand-in work",
                   [fn, ctx] { fn(ctx); }, std::move(accesses));
}

SIM_API void ncsim_trace(const char* kind, const char* detail) { trace(kind ? kind : "?", detail ? detail : ""); }

SIM_API int ncsim_current_device(void) { return context_device(current_context()); }
