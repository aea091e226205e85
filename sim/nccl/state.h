// The simulated NCCL's internal interfaces, shared by its source files (one concern each):
//   comm.cpp         unique ids, communicators (init, abort, destroy), errors, version
//   segment.cpp      the shared-memory segment of a communicator and the step protocol between its ranks
//   collectives.cpp  the five collectives, groups, and their arithmetic, queued on the simulated streams
//   faults.cpp       fault injection from the environment (NC_SIM_NCCL_FAIL, NC_SIM_NCCL_STUCK)
//   ncsim.cpp        the simulated driver's ncsim_* functions (sim/include/ncsim.h), found in the loaded driver
//   unsupported.cpp  every other NCCL entry point: a stderr line and an error, never a silent success
// Nothing here is exported: the library exports only NCCL's documented entry points.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <mutex>
#include <string>

#include "nccl_abi.h"
#include "ncsim_client.h"

namespace nccl {

// ---- comm.cpp: messages and communicators ---------------------------------------------------------------
// One "nc-sim NCCL: ..." line on stderr; returns `code` (so a refusal is `return refuse(...)`).
ncclResult_t refuse(ncclResult_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
const char* result_name(ncclResult_t r);

constexpr int MAX_RANKS = 64;

struct Segment;  // segment.cpp: the shared memory all ranks of a communicator map

// One rank's communicator, in this process. Never freed (queued work may still point at it after destroy or
// abort, as the driver keeps destroyed streams): `closed` tells such work to do nothing.
struct Comm {
    static constexpr uint64_t MAGIC = 0x6e6373696d6e636c;  // "ncsimncl"
    uint64_t magic = MAGIC;
    int rank = 0;
    int nranks = 0;
    int device = 0;
    Segment* segment = nullptr;
    size_t map_bytes = 0;
    // Steps of the protocol this rank has completed (segment.cpp); touched only by the work that runs the
    // collectives, which runs one at a time per communicator (`m`, `running`).
    uint32_t step = 0;
    // Collective calls made on this communicator so far (the host side; numbers them for messages).
    uint64_t calls = 0;

    std::atomic<bool> aborted{false};
    std::atomic<int> async_error{ncclSuccess};
    std::mutex m;  // guards the fields below and last_error
    std::condition_variable cv;
    bool closed = false;     // destroyed or aborted: queued work does nothing
    bool running = false;    // a collective of this communicator is running on a stream worker now
    uint64_t queued = 0;     // collectives queued (calls that passed their checks)
    uint64_t finished = 0;   // collectives that ran (or were skipped because the communicator closed)
    std::string last_error;  // ncclGetLastError's text for this communicator
};

// The live communicator behind a handle, or nullptr (with a line naming `call`) for a destroyed, aborted or
// made-up one.
Comm* live_comm(ncclComm_t handle, const char* call);
// Records an asynchronous error (ncclCommGetAsyncError reports it) with its message, printed once.
void set_async_error(Comm* c, ncclResult_t code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

// ---- segment.cpp: the shared-memory transport --------------------------------------------------------------
// Creates or opens the segment `name` for `nranks` ranks and waits until every rank has joined; on success
// c->segment and c->map_bytes are set and the name is unlinked (the mappings keep it alive).
ncclResult_t segment_join(Comm* c, const char* name);
void segment_unmap(Comm* c);
// Wakes every rank of this process blocked on the segment (after an abort).
void segment_wake_all(Comm* c);
// Bytes of one rank's slot: what a rank contributes in one step.
size_t slot_bytes(const Comm* c);

// What one step of a collective is, as every rank posts it: all ranks must post the same.
struct StepDesc {
    uint64_t collective = 0;  // the collective's number on this communicator (1, 2, ...)
    int32_t kind = 0;         // Kind
    int32_t dtype = 0;
    uint64_t count = 0;
    int32_t root = -1;
    int32_t pad = 0;
};
// The two halves of one step. post: waits until every peer has read this rank's slot of the step before, lets
// `fill` write this rank's slot (may be nullptr: nothing to contribute), publishes it with `desc`, and waits
// until every rank has published this step (their descriptors must equal `desc`). Then the caller reads the
// slots (`slot_of`) and calls step_done. False when the communicator was aborted, or the collective can never
// complete (an asynchronous error was recorded): the caller stops.
bool step_post(Comm* c, const StepDesc& desc, void (*fill)(void* slot, void* arg), void* arg);
const unsigned char* slot_of(const Comm* c, int rank);
void step_done(Comm* c);
// Blocks until the communicator is aborted (a collective that can never complete holds its stream, as a
// kernel spinning on a flag that never comes would).
void block_until_abort(Comm* c);

// ---- collectives.cpp --------------------------------------------------------------------------------------
enum Kind { ALL_REDUCE = 1, REDUCE = 2, BROADCAST = 3, ALL_GATHER = 4, REDUCE_SCATTER = 5 };
const char* kind_name(int kind);
const char* dtype_name(int dtype);
size_t dtype_bytes(int dtype);  // 0 for an unknown type

// ---- faults.cpp: NC_SIM_NCCL_FAIL=rank:call[:async], NC_SIM_NCCL_STUCK=rank:call ----------------------------
enum class Fault { NONE, FAIL_NOW, FAIL_ASYNC, STUCK };
// False (with a line saying how to write them) when a variable is malformed.
bool faults_valid();
// The fault for the `call`-th collective call (1-based) on a communicator of rank `rank`.
Fault fault_for(int rank, uint64_t call);

// ---- ncsim.cpp: the simulated driver ----------------------------------------------------------------------
// The driver's functions, or nullptr (with a line naming `call`) when the loaded libcuda.so.1 is not the
// simulated one.
const Ncsim* ncsim(const char* call);

}  // namespace nccl
