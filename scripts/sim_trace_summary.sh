#!/usr/bin/env bash
# Summarizes a simulated-GPU trace (NC_SIM_TRACE=FILE, docs/simulated-gpu.md): the launches per kernel, GEMMs
# per shape, transfers up and down (count and bytes), host synchronizations, allocations and frees of each
# stretch, then the file's totals.
#   scripts/sim_trace_summary.sh TRACE [N]     (N: only the N-th stretch, counted from 1)
# The stretches: when the trace has profiler marks (`nc-train --profile-steps A:B` calls cuProfilerStart before
# step A and cuProfilerStop after step B, and the simulator writes both into the trace), each start..stop is
# one stretch, exactly those steps. Otherwise a stretch ends at each read-back into pageable host memory ("d2h"
# followed by its "sync"): a rough cut, since a training step reads back more than once (and evaluation and
# sampling read back too).
set -euo pipefail
if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: scripts/sim_trace_summary.sh TRACE_FILE [N]  (a file written under NC_SIM_TRACE)" >&2
    exit 2
fi
marks=0
grep -q $'\tprofiler\t' "$1" && marks=1
awk -F'\t' -v only="${2:-0}" -v marks="$marks" '
function flush(what) {
    if (!events) return
    stretch++
    if (only == 0 || only == stretch) {
        printf "== %s %d: %d events; %d uploads (%d B), %d read-backs (%d B); %d host syncs; %d allocs, %d frees\n",
            what, stretch, events, n_up, up, n_down, down, syncs, allocs, frees
        for (k in n) printf "   %6d  %s\n", n[k], k
    }
    delete n; events = up = down = n_up = n_down = syncs = allocs = frees = 0
}
/^#/ { totals = totals $0 "\n"; next }
{
    kind = $2; detail = $3
    if (marks && kind == "profiler") {
        if (detail == "start") { inside = 1; events = 0 } else { flush("capture"); inside = 0 }
        next
    }
    if (marks && !inside) next
    events++
    if (kind == "launch") { split(detail, w, " "); n["launch " w[1]]++ }
    else if (kind == "gemm") n["gemm " detail]++
    else if (kind == "h2d") { up += detail; n_up++ }
    else if (kind == "d2h") { down += detail; n_down++; pending_read = 1 }
    else if (kind == "sync") { syncs++; n["sync " detail]++; if (!marks && pending_read) { pending_read = 0; flush("stretch") } }
    else if (kind == "alloc") allocs++
    else if (kind == "free") frees++
    else n[kind " " detail]++
}
END { if (!marks) flush("stretch"); if (only == 0) printf "%s", totals }
' "$1"
