# Shared steps of run3b.sh, run7b.sh and speedrun.sh (sourced, not run).
#
# From a folder of FineWeb-Edu parquet shards (nanochat's base_data: shard_00000.parquet ... shard_01822.parquet,
# the last one in the folder held out for validation) this builds nc's binaries, downloads the shards the run
# needs if the folder lacks them (`nc-data download`), trains the tokenizer, tokenizes the shards into token
# shards, prints the plan, and trains. Every step that already has its output is skipped, so a script can be
# re-run after an interruption (training then needs --resume, passed through: nc-train refuses a new run in an
# out dir that holds one, so a re-run without it stops there with nothing changed). Each step starts only after the
# one before it completed (a failed download stops the script before any training).
#
# Environment:
#   PARQUET_DIR   folder of the parquet shards (default: nanochat's, $NANOCHAT_BASE_DIR/base_data or
#                 ~/.cache/nanochat/base_data, so shards nanochat already downloaded are reused)
#   DOWNLOAD      1 (default): fetch missing shards with `nc-data download` (NC_DATA_BASE_URL picks another
#                 server); 0: never download, use what PARQUET_DIR holds
#   DATA_DIR      where the tokenizer and token shards go (default: data/fineweb-edu)
#   WORLD_SIZE    GPUs (default 8)
#   GPU_MEM       memory per GPU for the plan (default 187.5GB, the scaling plan's node); or set GPU=h100|h200|b200
#   TOKENIZER_SHARDS  parquet shards to train the tokenizer on (default 8: ~2e9 characters, as nanochat)
#   VOCAB_SIZE    tokenizer vocabulary (default 65536)
#
# Which parquet file is validation: the last one in PARQUET_DIR when the token shards are made (nanochat's rule),
# so it changes when the folder grows (download -n 101, later -n 201: shard_00100 was validation, now it is a
# training file and shard_00200 is validation). The token shards therefore record the split they were made
# from (DATA_DIR/shards/parquet_inputs.txt) and are reused as they are, validation included, whatever the folder
# holds later; a run that wants more training shards than they hold stops and says to re-tokenize (move
# DATA_DIR/shards away, or use another DATA_DIR), rather than training on the smaller set.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARQUET_DIR="${PARQUET_DIR:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/base_data}"
DOWNLOAD="${DOWNLOAD:-1}"
DATA_DIR="${DATA_DIR:-$ROOT/data/fineweb-edu}"
WORLD_SIZE="${WORLD_SIZE:-8}"
# Not exported: nc-train reads WORLD_SIZE from its environment as a launcher's (torchrun's) variable and would
# take itself for one rank of a launched job; the scripts pass it as --world-size instead.
export -n WORLD_SIZE
TOKENIZER_SHARDS="${TOKENIZER_SHARDS:-8}"
VOCAB_SIZE="${VOCAB_SIZE:-65536}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

build() {
  (cd "$ROOT" && cargo build --release --bin nc-train --bin nc-data)
  NC_TRAIN="$TARGET/release/nc-train"
  NC_DATA="$TARGET/release/nc-data"
}

# The parquet files in PARQUET_DIR, sorted (temporary `.parquet.tmp` files of a download are not among them).
list_parquet() {
  PARQUET_FILES=()
  if [ -d "$PARQUET_DIR" ]; then
    mapfile -t PARQUET_FILES < <(find "$PARQUET_DIR" -maxdepth 1 -name '*.parquet' | sort)
  fi
}

# stamp_value FILE KEY: the value of KEY=VALUE in a parquet_inputs.txt.
stamp_value() { sed -n "s/^$2=//p" "$1"; }

# prepare_data NUM_TRAIN_SHARDS: tokenizer + token shards from the first NUM_TRAIN_SHARDS parquet files and the
# last parquet file as validation, downloading NUM_TRAIN_SHARDS + 1 shards first if PARQUET_DIR has fewer.
prepare_data() {
  local want="$1" asked="$1"
  local shards="$DATA_DIR/shards" stamp="$DATA_DIR/shards/parquet_inputs.txt"

  # Token shards already made: reuse them (their validation shard included) if they were made for at least
  # this many training shards (`asked`: what the run that made them wanted, even if the folder held fewer).
  if [ -d "$shards" ]; then
    if [ ! -d "$DATA_DIR/tokenizer" ]; then
      echo "$shards exists but $DATA_DIR/tokenizer does not: the tokens cannot be read without their tokenizer; move $shards away to start over" >&2
      exit 1
    fi
    if [ -f "$stamp" ]; then
      local made_for
      made_for="$(stamp_value "$stamp" asked)"
      if [ "${made_for:-0}" -lt "$want" ]; then
        echo "$shards holds the tokens of $(stamp_value "$stamp" train_files) training parquet shards (made for a run that wanted ${made_for:-?}); this run wants $want." >&2
        echo "Move $shards away (or set DATA_DIR to a new folder) to tokenize again; the tokenizer is kept." >&2
        exit 1
      fi
      echo "== reusing token shards in $shards: $(stamp_value "$stamp" train_files) training parquet shards, validation $(stamp_value "$stamp" val)"
    else
      echo "== reusing token shards in $shards (no parquet_inputs.txt: made by hand or by an older script)"
    fi
    return
  fi

  list_parquet
  if [ "${#PARQUET_FILES[@]}" -lt $((want + 1)) ]; then
    if [ "$DOWNLOAD" = 1 ]; then
      echo "== downloading $((want + 1)) FineWeb-Edu shards ($want for training + 1 for validation) into $PARQUET_DIR (${#PARQUET_FILES[@]} parquet files there now)"
      # set -e: a failed download (its files are listed) stops the script here; re-running resumes it.
      "$NC_DATA" download -n $((want + 1)) --out "$PARQUET_DIR"
      list_parquet
    elif [ ! -d "$PARQUET_DIR" ]; then
      echo "no parquet folder at $PARQUET_DIR: set PARQUET_DIR, or DOWNLOAD=1 to fetch the shards (nc-data download -n $((want + 1)))" >&2
      exit 1
    fi
  fi
  local all=("${PARQUET_FILES[@]}")
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
  # Each product is made under a temporary name and renamed when complete, so an interrupted step is redone
  # rather than its partial output reused.
  if [ ! -d "$DATA_DIR/tokenizer" ]; then
    local tk=$((TOKENIZER_SHARDS < n ? TOKENIZER_SHARDS : n))
    echo "== training the tokenizer on $tk parquet shards"
    rm -rf "$DATA_DIR/tokenizer.tmp"
    "$NC_DATA" train-tokenizer --input "${all[@]:0:$tk}" --vocab-size "$VOCAB_SIZE" --out "$DATA_DIR/tokenizer.tmp"
    mv "$DATA_DIR/tokenizer.tmp" "$DATA_DIR/tokenizer"
  fi
  if [ ! -d "$shards" ]; then
    echo "== tokenizing $want training shards and $(basename "$val") for validation"
    rm -rf "$shards.tmp"
    "$NC_DATA" tokenize --input "${all[@]:0:$want}" "$val" --tokenizer "$DATA_DIR/tokenizer" --out "$shards.tmp"
    {
      echo "asked=$asked"
      echo "train_files=$want"
      echo "train_first=$(basename "${all[0]}")"
      echo "train_last=$(basename "${all[$((want - 1))]}")"
      echo "val=$(basename "$val")"
    } >"$shards.tmp/parquet_inputs.txt"
    mv "$shards.tmp" "$shards"
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
