// Every other NCCL entry point of cudarc's bindings: one stderr line naming it and ncclInvalidUsage, never a
// silent success. The stubs take no parameters: on x86-64 and aarch64 the caller owns its arguments, so
// ignoring them is safe.
#include "state.h"

// The entry points of cudarc's NCCL bindings (nccl-02030) that return ncclResult_t and are not implemented.
#define NCCL_SIM_UNSUPPORTED_LIST(X) \
    X(ncclAlltoAll) \
    X(ncclCommDeregister) \
    X(ncclCommFinalize) \
    X(ncclCommGetUniqueId) \
    X(ncclCommGrow) \
    X(ncclCommInitAll) \
    X(ncclCommInitRankConfig) \
    X(ncclCommInitRankScalable) \
    X(ncclCommMemStats) \
    X(ncclCommRegister) \
    X(ncclCommResume) \
    X(ncclCommRevoke) \
    X(ncclCommShrink) \
    X(ncclCommSplit) \
    X(ncclCommSuspend) \
    X(ncclCommWindowDeregister) \
    X(ncclCommWindowRegister) \
    X(ncclGather) \
    X(ncclGroupSimulateEnd) \
    X(ncclMemAlloc) \
    X(ncclMemFree) \
    X(ncclParamBind) \
    X(ncclParamGet) \
    X(ncclParamGetAllParameterKeys) \
    X(ncclParamGetI16) \
    X(ncclParamGetI32) \
    X(ncclParamGetI64) \
    X(ncclParamGetI8) \
    X(ncclParamGetParameter) \
    X(ncclParamGetStr) \
    X(ncclParamGetU16) \
    X(ncclParamGetU32) \
    X(ncclParamGetU64) \
    X(ncclParamGetU8) \
    X(ncclPutSignal) \
    X(ncclRecv) \
    X(ncclRedOpCreatePreMulSum) \
    X(ncclRedOpDestroy) \
    X(ncclScatter) \
    X(ncclSend) \
    X(ncclSignal) \
    X(ncclWaitSignal) \
    X(ncclWinGetUserPtr)

#define NCSIM_NCCL_UNSUPPORTED(name)                                                                       \
    NCCL_API ncclResult_t name() {                                                                         \
        return nccl::refuse(ncclInvalidUsage, "%s is not implemented by the simulated NCCL (its arguments " \
                            "were not read)", #name);                                                      \
    }

NCCL_SIM_UNSUPPORTED_LIST(NCSIM_NCCL_UNSUPPORTED)
