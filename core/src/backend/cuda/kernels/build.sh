#!/usr/bin/env bash
# Regenerates ns_norm.ptx from ns_norm.cu with the pinned nvcc 13.0 (as kernels-ptx/build_ptx.sh does for
# the model's kernels: compute_80 PTX, which the driver JITs for Ampere and newer), then checks that ptxas
# assembles it for sm_80 and sm_90.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC_DIR="${NVCC_DIR:-/tmp/cuda13/nvidia/cu13}"
"$NVCC_DIR/bin/nvcc" -arch=compute_80 -ptx -O3 -o "$here/ns_norm.ptx" "$here/ns_norm.cu"
# Drop the absolute path nvcc may record, so the checked-in file does not depend on the checkout's place.
sed -i "s|$here/||g" "$here/ns_norm.ptx"
# Line 1: the FNV-1a 64 hash of the .cu's exact bytes, as kernels-ptx/build_ptx.sh writes it: the simulated
# driver (docs/simulated-gpu.md) refuses a PTX whose source changed since, and core/tests/engine_ptx.rs checks it.
hash="$(python3 -c '
import sys
h = 0xcbf29ce484222325
for b in open(sys.argv[1], "rb").read():
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print("%016x" % h)' "$here/ns_norm.cu")"
sed -i "1i // nc-source-fnv1a64: $hash" "$here/ns_norm.ptx"
for sm in sm_80 sm_90; do
    "$NVCC_DIR/bin/ptxas" -arch="$sm" -v -o /dev/null "$here/ns_norm.ptx"
done
