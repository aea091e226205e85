#!/usr/bin/env bash
# Summarizes a simulated-GPU trace (NC_SIM_TRACE=FILE, docs/simulated-gpu.md) per step: a step ends at each
# read-back to pageable host memory ("d2h" followed by its "sync"), which is how nc's training loop reads the
# loss once per optimizer step. Prints, per step, the launches per kernel, GEMMs per shape, bytes up and down,
# host synchronizations and allocations; then the file's totals.
#   scripts/sim_trace_summary.sh TRACE [STEP]     (STEP: only that step, counted from 1)
set -euo pipefail
if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: scripts/sim_trace_summary.sh TRACE_FILE [STEP]  (a file written under NC_SIM_TRACE)" >&2
    exit 2
fi
awk -F'\t' -v only="${2:-0}" '
function flush() {
    if (!events) return
    step++
    if (only == 0 || only == step) {
        printf "== step %d: %d events, %d B up, %d B down, %d host syncs, %d allocs, %d frees\n", step, events, up, down, syncs, allocs, frees
        for (k in n) printf "   %6d  %s\n", n[k], k
    }
    delete n; events = up = down = syncs = allocs = frees = 0
}
/^#/ { totals = totals $0 "\n"; next }
{
    events++
    kind = $2; detail = $3
    if (kind == "launch") { split(detail, w, " "); n["launch " w[1]]++ }
    else if (kind == "gemm") n["gemm " detail]++
    else if (kind == "h2d") up += detail
    else if (kind == "d2h") { down += detail; pending_read = 1 }
    else if (kind == "sync") { syncs++; if (pending_read) { pending_read = 0; flush() } }
    else if (kind == "alloc") allocs++
    else if (kind == "free") frees++
}
END { flush(); if (only == 0) printf "%s", totals }
' "$1"
