#!/usr/bin/env bash
# The ~3B model of the scaling plan (seed/scaling-3b-7b.md): depth 38 (d 2432, 19 heads), 48 x 2048 tokens per
# GPU on 8 GPUs = 786,432 tokens per step, no gradient accumulation, 20 tokens per parameter (60.3e9 tokens,
# 76,696 steps). Our plan, not the document's: 1.94e10 FLOPs/token, ~82 h on 8 x H100 (~36 h on 8 x B200) at
# 50% MFU, and it fits in 187.5 GB per GPU only with activation recomputation (~262 GB of activations
# without it).
#
# Data: 60.3e9 tokens x ~4.8 characters/token / 250e6 characters per shard = ~1,160 parquet shards -> 1,200.
# Extra arguments go to nc-train, e.g. a dry run: scripts/run3b.sh --num-iterations=100
source "$(dirname "$0")/common.sh"
build
prepare_data 1200
plan_and_train --depth 38 --device-batch-size 48 --total-batch-size 786432 --model-tag 3b -- "$@"
