// How the simulated NCCL reaches the simulated device: the ncsim_* functions of the already-loaded simulated
// driver (sim/include/ncsim_client.h), found on first use. Device pointers of the simulated device are host
// addresses of this process, so a collective running on a stream worker reads and writes them directly.
#include "state.h"

namespace nccl {

const Ncsim* ncsim(const char* call) {
    const Ncsim* functions = ncsim_functions();
    if (!functions)
        refuse(ncclUnhandledCudaError, "%s: the simulated NCCL needs the simulated driver (ncsim_* not found in the "
               "loaded libcuda.so.1); run through scripts/sim.sh, or put NVIDIA's NCCL on LD_LIBRARY_PATH for real "
               "GPUs", call);
    return functions;
}

}  // namespace nccl
