#!/usr/bin/env bash
# Profile a few steps of a real nc-train run with Nsight Systems, then print where the GPU time went.
#
#   scripts/profile.sh [--steps A:B] [--out DIR] [--top N] [--dry-run] -- NC_TRAIN_FLAGS...
#   e.g. scripts/profile.sh --steps 5:7 -- --backend cuda --depth 20 --dbs 16 --num-iterations 8 --eval-every 0
#
# 1. `nsys profile` runs nc-train with `--profile-steps A:B`: nc-train calls cuProfilerStart before step A and
#    cuProfilerStop after step B, and nsys (--capture-range=cudaProfilerApi) records only that window, so
#    start-up, the first evaluation and warm-up stay out of the numbers. It traces CUDA (kernels, copies,
#    syncs), NVTX (nc's ranges: step, micro-step, forward, loss, backward, "layer N fwd/bwd", optimizer, comm)
#    and OS runtime calls.
# 2. `nsys stats` prints the top N kernels by total GPU time (cuda_gpu_kern_sum) and the NVTX ranges' times
#    (nvtx_sum); the report DIR/nc_profile.nsys-rep opens in the Nsight Systems GUI for the timeline.
# README.md "Profiling" says how to read the tables.
#
# Options:
#   --steps A:B  steps to capture, inclusive (default 5:7; nc-train must run past B: give --num-iterations)
#   --out DIR    where the report goes (default profile/, git-ignored); the run's own files go to DIR/train
#   --top N      kernels to list (default 15)
#   --dry-run    print the commands and run nothing (no nsys or GPU needed)
# Environment: NC_TRAIN (the nc-train binary; default gpu-check/nc-train if built by gpu_check.sh, else
# target/release/nc-train), NSYS (default nsys).
# Unverified: nsys has not run this script on a GPU machine yet (no GPU was lent while it was written).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=5:7
out=profile
top=15
dry_run=0
usage() {
  echo "usage: scripts/profile.sh [--steps A:B] [--out DIR] [--top N] [--dry-run] -- NC_TRAIN_FLAGS..." >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) [ $# -ge 2 ] || usage; steps=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --top) [ $# -ge 2 ] || usage; top=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "profile.sh: unknown option '$1' (nc-train's flags go after --)" >&2; usage ;;
  esac
done
if ! [[ "$steps" =~ ^([0-9]+):([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -gt "${BASH_REMATCH[2]}" ]; then
  echo "profile.sh: --steps '$steps' is not A:B with A <= B (e.g. --steps 5:7)" >&2
  exit 2
fi
if ! [[ "$top" =~ ^[1-9][0-9]*$ ]]; then
  echo "profile.sh: --top '$top' is not a positive number" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "profile.sh: give nc-train's flags after -- (at least --backend cuda and --num-iterations past the steps)" >&2
  exit 2
fi

nc_train=${NC_TRAIN:-}
if [ -z "$nc_train" ]; then
  if [ -x gpu-check/nc-train ]; then nc_train=gpu-check/nc-train; else nc_train=target/release/nc-train; fi
fi
nsys=${NSYS:-nsys}
report="$out/nc_profile"

# show CMD...: print a command as it would be typed (each word shell-quoted)
show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}
# run_cmd CMD...: print it, and run it unless this is a dry run
run_cmd() {
  show "$@"
  [ "$dry_run" = 1 ] || "$@"
}

if [ "$dry_run" = 0 ]; then
  command -v "$nsys" >/dev/null || { echo "profile.sh: '$nsys' not found; install Nsight Systems or set NSYS" >&2; exit 1; }
  [ -x "$nc_train" ] || { echo "profile.sh: $nc_train is missing; cargo build --release -p nc-train, or set NC_TRAIN" >&2; exit 1; }
  mkdir -p "$out"
fi

# The profiled run writes its metrics and checkpoint into DIR/train, profile.sh's own folder, emptied first like
# the report it overwrites: nc-train refuses a new run in a folder holding another's, so a default out dir
# (runs/<tag>) would stop the second profile of the same flags, and could hold a real run of that model.
# An --out-dir among the flags comes last and wins (nothing of it is deleted).
run_cmd rm -rf "$out/train"
run_cmd "$nsys" profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
  --force-overwrite=true --output="$report" "$nc_train" --profile-steps "$steps" --out-dir "$out/train" "$@"

# The kernel summary comes sorted by total time, largest first; keep the header and the top N rows.
echo "== top $top kernels by total GPU time (steps $steps)"
if [ "$dry_run" = 1 ]; then
  show "$nsys" stats --report cuda_gpu_kern_sum --format csv --output - "$report.nsys-rep"
else
  "$nsys" stats --report cuda_gpu_kern_sum --format csv --output - "$report.nsys-rep" |
    python3 -c '
import csv, sys
top = int(sys.argv[1])
rows = [r for r in csv.reader(sys.stdin) if r]
# nsys prints notes before the table: the header is the row that names the columns
start = next((i for i, r in enumerate(rows) if "Time (%)" in r), None)
if start is None:
    sys.exit("profile.sh: no kernel table in the report (was anything captured? check --steps against --num-iterations)")
head, body = rows[start], rows[start + 1 :]
pct, total, calls, avg, name = (head.index(c) for c in ("Time (%)", "Total Time (ns)", "Instances", "Avg (ns)", "Name"))
print("%7s %10s %7s %9s  %s" % ("time %", "total ms", "calls", "avg us", "kernel"))
for r in body[:top]:
    print("%7.1f %10.3f %7s %9.1f  %s" % (float(r[pct]), float(r[total]) / 1e6, r[calls], float(r[avg]) / 1e3, r[name][:110]))
print("(%d kernels in all)" % len(body))
' "$top"
fi
echo "== NVTX ranges (nc's phases: where each step's time went)"
run_cmd "$nsys" stats --report nvtx_sum --format table --output - "$report.nsys-rep"
echo "report: $report.nsys-rep (open in nsys-ui for the timeline)"
