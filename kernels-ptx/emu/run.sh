#!/usr/bin/env bash
# Builds and runs the CPU emulation checks of the kernels: every emu/test*.cpp is its own program (see
# test.cpp). Needs g++ with C++20; no CUDA. shim/ stands in for CUDA's headers (<cuda_bf16.h>).
# -ffp-contract=off: no fused multiply-adds, so the optimizer kernels can be checked bit for bit.
# -rdynamic: race reports name kernels by their symbol (emu.h's emu_kernel_name); -ldl: dladdr before glibc 2.34.
# Race mode: every program is compiled with -fsanitize=thread, which makes g++ call a hook before each load
# and store, linked WITHOUT libtsan (emu_race.h defines the hooks), and run with NC_SIM_RACE=1: a
# shared-memory race or a cp.async read before its wait in any kernel is reported and fails the program
# (see emu_race.h; test_race.cpp checks the checker on planted bugs).
# The programs build and run in parallel (each compile + run is one background job); their outputs are
# printed in a fixed order afterwards. Each program prints "N failures" last and exits non-zero on a
# failure; this script prints the total as "\n<total> failures" and fails if any program failed.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
build_and_run() {
    local src="$1" name
    name="$(basename "$src" .cpp)"
    local flags=(-std=c++20 -O1 -ffp-contract=off -pthread -I"$here/shim" -I"$here" -I"$here/../cuda")
    if ! g++ "${flags[@]}" -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 -c "$src" -o "$out/$name.o" \
        >"$out/$name.log" 2>&1 || ! g++ -pthread -rdynamic "$out/$name.o" -o "$out/$name" -ldl >>"$out/$name.log" 2>&1; then
        echo "$name: compile failed" >>"$out/$name.log"
        return 1
    fi
    NC_SIM_RACE=1 "$out/$name" >>"$out/$name.log" 2>&1 || { echo "$name: FAILED" >>"$out/$name.log"; return 1; }
}
pids=()
names=()
for src in "$here"/test*.cpp; do
    build_and_run "$src" &
    pids+=($!)
    names+=("$(basename "$src" .cpp)")
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    echo "== ${names[$i]}"
    cat "$out/${names[$i]}.log"
done
if [[ $status -ne 0 ]]; then
    echo
    echo "some emulation programs failed"
    exit 1
fi
echo
echo "0 failures"
