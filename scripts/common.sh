# Shared steps of run3b.sh, run7b.sh and speedrun.sh (sourced, not run).
#
# From a folder of FineWeb-Edu parquet shards (nanochat's base_data: shard_00000.parquet ... shard_01822.parquet,
# the last one held out for validation) this builds nc's binaries, trains the tokenizer, tokenizes the shards
# the run needs into token shards, prints the plan, and trains. Every step that already has its output is
# skipped, so a script can be re-run after an interruption (training then needs --resume, passed through).
#
# Environment:
#   PARQUET_DIR   folder of the parquet shards (default: ~/.cache/nanochat/base_data, where nanochat puts them)
#   DATA_DIR      where the tokenizer and token shards go (default: data/fineweb-edu)
#   WORLD_SIZE    GPUs (default 8)
#   GPU_MEM       memory per GPU for the plan (default 187.5GB, the scaling plan's node); or set GPU=h100|h200|b200
#   TOKENIZER_SHARDS  parquet shards to train the tokenizer on (default 8: ~2e9 characters, as nanochat)
#   VOCAB_SIZE    tokenizer vocabulary (default 65536)

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARQUET_DIR="${PARQUET_DIR:-$HOME/.cache/nanochat/base_data}"
DATA_DIR="${DATA_DIR:-$ROOT/data/fineweb-edu}"
WORLD_SIZE="${WORLD_SIZE:-8}"
TOKENIZER_SHARDS="${TOKENIZER_SHARDS:-8}"
VOCAB_SIZE="${VOCAB_SIZE:-65536}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

build() {
  (cd "$ROOT" && cargo build --release --bin nc-train --bin nc-data)
  NC_TRAIN="$TARGET/release/nc-train"
  NC_DATA="$TARGET/release/nc-data"
}

# prepare_data NUM_TRAIN_SHARDS: tokenizer + token shards from the first NUM_TRAIN_SHARDS parquet files and the
# last parquet file as validation.
prepare_data() {
  local want="$1"
  if [ ! -d "$PARQUET_DIR" ]; then
    echo "no parquet folder at $PARQUET_DIR: download FineWeb-Edu shards there (nanochat: python -m nanochat.dataset -n $want) or set PARQUET_DIR" >&2
    exit 1
  fi
  mapfile -t all < <(find "$PARQUET_DIR" -maxdepth 1 -name '*.parquet' | sort)
  local have=${#all[@]}
  if [ "$have" -lt 2 ]; then
    echo "$PARQUET_DIR holds $have parquet files; it needs training shards plus one validation shard" >&2
    exit 1
  fi
  local val="${all[$((have - 1))]}"
  local n=$((have - 1))
  if [ "$n" -lt "$want" ]; then
    echo "warning: the run wants $want training shards, $PARQUET_DIR has $n; training will repeat data (the loader wraps)" >&2
    want=$n
  fi
  if [ ! -d "$DATA_DIR/tokenizer" ]; then
    local tk=$((TOKENIZER_SHARDS < n ? TOKENIZER_SHARDS : n))
    echo "== training the tokenizer on $tk parquet shards"
    "$NC_DATA" train-tokenizer --input "${all[@]:0:$tk}" --vocab-size "$VOCAB_SIZE" --out "$DATA_DIR/tokenizer"
  fi
  if [ ! -d "$DATA_DIR/shards" ]; then
    echo "== tokenizing $want training shards and $(basename "$val") for validation"
    "$NC_DATA" tokenize --input "${all[@]:0:$want}" "$val" --tokenizer "$DATA_DIR/tokenizer" --out "$DATA_DIR/shards"
  fi
}

# plan_and_train FLAGS... -- EXTRA...: print the plan for the node, then train; EXTRA (the script's own
# arguments, e.g. --num-iterations=100 for a dry run) go to both.
plan_and_train() {
  local flags=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do flags+=("$1"); shift; done
  [ "$#" -gt 0 ] && shift
  local mem=()
  if [ -n "${GPU:-}" ]; then mem=(--gpu "$GPU"); else mem=(--gpu-mem "${GPU_MEM:-187.5GB}"); fi
  echo "== plan"
  "$NC_TRAIN" --plan "${flags[@]}" --world-size "$WORLD_SIZE" --data-dir "$DATA_DIR" "${mem[@]}" "$@"
  echo "== training"
  "$NC_TRAIN" "${flags[@]}" --world-size "$WORLD_SIZE" --data-dir "$DATA_DIR" "$@"
}
