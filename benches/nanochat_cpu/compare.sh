#!/usr/bin/env bash
# nc's CPU step against nanochat's, interleaved: each round runs nc (the CPU's own vector level), nc forced
# to AVX2 (NC_CPU_ISA=avx2), optionally an older nc binary, then nanochat under torch.compile and eager, so
# load changes on a shared machine hit every engine alike. Prints each run's median step; take the median over
# rounds. Threads: 2 for everyone.
#
#   benches/nanochat_cpu/compare.sh PYTHON NANOCHAT_DIR STEP_CPU_BINARY [OLD_STEP_CPU_BINARY] -- STEP ARGS
#   e.g. benches/nanochat_cpu/compare.sh ~/venv/bin/python /tmp/nanochat-oct2025 \
#          target/release/deps/step_cpu-<hash> -- --vocab 8192 --batch 8 --seq 256
# ROUNDS (default 3) and STEPS (default 5) come from the environment.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,10p' "$0"
    exit 2
fi
python=$1 nanochat=$2 nc=$3
shift 3
old=""
if [ "$1" != "--" ]; then
    old=$1
    shift
fi
if [ "$1" != "--" ]; then
    echo "expected -- before the step arguments" >&2
    exit 2
fi
shift
rounds=${ROUNDS:-3} steps=${STEPS:-5}
here=$(dirname "$0")
# Pull "--vocab V --batch B --seq T" out for nanochat (same names, same meaning).
vocab=8192 batch=8 seq=256
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[$i]} in
    --vocab) vocab=${args[$((i + 1))]} ;;
    --batch) batch=${args[$((i + 1))]} ;;
    --seq) seq=${args[$((i + 1))]} ;;
    esac
done
# "median step s, matmul share of the op time %" from a step_cpu report.
nc_summary() { awk '/median step time/ {m = $NF} /^matmul/ {g += $(NF-2)} END {printf "%s s, matmul %.1f%%", m, g}'; }
for ((r = 1; r <= rounds; r++)); do
    echo "round $r $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    echo "  nc $("$nc" "$@" --threads 2 --steps "$steps" | nc_summary)"
    echo "  nc NC_CPU_ISA=avx2 $(NC_CPU_ISA=avx2 "$nc" "$@" --threads 2 --steps "$steps" | nc_summary)"
    if [ -n "$old" ]; then
        echo "  nc old binary $("$old" "$@" --threads 2 --steps "$steps" | nc_summary)"
    fi
    for mode in compile eager; do
        flag=""
        [ $mode = eager ] && flag=--eager
        out=$("$python" "$here/step.py" --nanochat "$nanochat" --threads 2 --depth 4 --vocab "$vocab" \
            --batch "$batch" --seq "$seq" --steps "$steps" $flag)
        echo "  nanochat $mode $(echo "$out" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["median_step_s"], "s")')"
    done
done
