// The slice of NCCL's C ABI (nccl.h, 2.30) that the simulated NCCL implements: result codes, data types,
// reduction operations, the unique id and the export macro. Values are NCCL's own (cudarc's bindings pass
// them through unchanged).
#pragma once
#include <cstddef>
#include <cstdint>

#define NCCL_API extern "C" __attribute__((visibility("default")))

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclTimeout = 8,
    ncclNumResults = 9
} ncclResult_t;

typedef enum {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes = 12
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

// The version this stand-in reports (NCCL_VERSION_CODE of 2.30.0: major * 10000 + minor * 100 + patch).
#define NCSIM_NCCL_VERSION 23000

struct ncclComm;
typedef struct ncclComm* ncclComm_t;
typedef void* cudaStream_t;
