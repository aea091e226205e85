#!/usr/bin/env bash
# Builds and runs the CPU emulation checks of the kernels: every emu/test*.cpp is its own program (see
# test.cpp). Needs g++ with C++20; no CUDA. shim/ stands in for CUDA's headers (<cuda_bf16.h>).
# -ffp-contract=off: no fused multiply-adds, so the optimizer kernels can be checked bit for bit.
# Each program prints "N failures" last and exits non-zero on a failure; this script prints the total as
# "\n<total> failures" and fails if any program failed.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for src in "$here"/test*.cpp; do
    name="$(basename "$src" .cpp)"
    echo "== $name"
    if ! g++ -std=c++20 -O1 -ffp-contract=off -pthread -I"$here/shim" -I"$here" -I"$here/../cuda" "$src" \
        -o "$out/$name"; then
        echo "$name: compile failed"
        status=1
        continue
    fi
    "$out/$name" || { echo "$name: FAILED"; status=1; }
done
if [[ $status -ne 0 ]]; then
    echo
    echo "some emulation programs failed"
    exit 1
fi
echo
echo "0 failures"
