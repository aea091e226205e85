#!/usr/bin/env bash
# Builds and runs the CPU emulation check of the kernels (see test.cpp). Needs g++ with C++20; no CUDA.
# -ffp-contract=off: no fused multiply-adds, so the optimizer kernels can be checked bit for bit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -pthread -I"$here/../cuda" "$here/test.cpp" -o "$out/emu_test"
"$out/emu_test"
