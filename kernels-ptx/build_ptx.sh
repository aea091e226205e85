#!/usr/bin/env bash
# Regenerates every ptx/<module>.ptx from cuda/<module>.cu with the pinned toolchain (nvcc 13.0, PTX ISA
# 9.0, compute_80), stamps each with the FNV-1a 64 hash of its source (tests/ptx_is_current.rs checks it),
# then assembles each PTX with ptxas for sm_90 and sm_80 and prints registers, spills and shared memory.
#
# Toolchain: NVCC_DIR is the directory holding bin/nvcc (default /tmp/cuda13/nvidia/cu13, a pip install
# that needs no GPU). To create the default:
#   pip install --target /tmp/cuda13 'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' \
#       'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*'
# Pin all five: a newer nvcc emits a PTX ISA that the target driver (580) rejects.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC_DIR="${NVCC_DIR:-/tmp/cuda13/nvidia/cu13}"
nvcc="$NVCC_DIR/bin/nvcc"
ptxas="$NVCC_DIR/bin/ptxas"
if [[ ! -x "$nvcc" || ! -x "$ptxas" ]]; then
    echo "build_ptx.sh: no nvcc/ptxas under NVCC_DIR=$NVCC_DIR" >&2
    echo "  install the pinned CUDA 13.0 compiler (no GPU needed):" >&2
    echo "    pip install --target /tmp/cuda13 'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' \\" >&2
    echo "        'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*'" >&2
    echo "  or point NVCC_DIR at a CUDA 13.0 install (the directory holding bin/nvcc)." >&2
    exit 1
fi
version="$("$nvcc" --version | grep -o 'release [0-9.]*' || true)"
if [[ "$version" != "release 13.0" ]]; then
    echo "build_ptx.sh: expected nvcc release 13.0, got '$version' (newer PTX ISAs are rejected by driver 580)" >&2
    exit 1
fi

# Writes ptx/<module>.ptx: the first line carries the FNV-1a 64 hash (16 hex digits) of the .cu file's exact
# bytes followed by those of each header it includes by `#include "NAME"` (cuda/NAME, in the order of the
# lines: block_reduce.cuh, bf16_io.cuh), so a changed header makes its includers' PTX stale; then nvcc's PTX with the absolute paths of its .file lines made relative (so the checked-in PTX
# does not depend on where the checkout or the toolchain lives; they only label -lineinfo's source lines).
stamp() {  # stamp <src.cu> <nvcc output> <destination>
    python3 - "$1" "$2" "$3" "$here/cuda/" "$NVCC_DIR/" <<'PY'
import sys
src, raw, dst, cuda_dir, nvcc_dir = sys.argv[1:]
import os, re
data = open(src, "rb").read()
for name in re.findall(rb'^#include "([^"]+)"', data, re.M):
    data += open(os.path.join(os.path.dirname(src), name.decode()), "rb").read()
h = 0xcbf29ce484222325
for b in data:
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
text = open(raw).read().replace('"' + cuda_dir, '"kernels-ptx/cuda/').replace('"' + nvcc_dir, '"cuda-13.0/')
open(dst, "w").write("// nc-source-fnv1a64: %016x\n" % h + text)
PY
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$here/cuda"  # compile by relative name, so the PTX's .file lines do not embed this checkout's path
for src in *.cu; do
    module="${src%.cu}"
    "$nvcc" -ptx -arch=compute_80 -O3 -lineinfo "$src" -o "$tmp/$module.ptx"
    stamp "$src" "$tmp/$module.ptx" "$here/ptx/$module.ptx"
    echo "wrote ptx/$module.ptx"
done

status=0
for arch in sm_90 sm_80; do
    echo "== ptxas -arch=$arch -v"
    for ptx in "$here"/ptx/*.ptx; do
        if ! "$ptxas" -arch="$arch" -v "$ptx" -o "$tmp/out.cubin" 2> "$tmp/log"; then
            cat "$tmp/log" >&2
            echo "build_ptx.sh: ptxas failed on $(basename "$ptx") for $arch" >&2
            status=1
            continue
        fi
        # One line per kernel: name, registers, spills, shared memory.
        awk -v f="$(basename "$ptx")" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes stack frame/ { frame = $0; sub(/^ptxas info *: */, "", frame) }
            /Used [0-9]+ registers/ {
                regs = $0; sub(/^.*Used /, "", regs)
                printf "  %-16s %-40s %s | %s\n", f, name, regs, frame
            }' "$tmp/log"
        if grep -qi "error" "$tmp/log"; then cat "$tmp/log" >&2; status=1; fi
    done
done
exit $status
