#!/usr/bin/env bash
# The ~7B model of the scaling plan: depth 52 (d 3328, 26 heads), 24 x 2048 tokens per GPU on 8 GPUs =
# 393,216 tokens per step, 20 tokens per parameter (147e9 tokens, 373,706 steps). Our plan: 4.70e10
# FLOPs/token, ~485 h on 8 x H100 (~213 h on 8 x B200) at 50% MFU; fits in 187.5 GB per GPU only with
# activation recomputation.
#
# Data: 147e9 tokens need ~2,822 shards; FineWeb-Edu has 1,823 (shard_00000 .. shard_01822: 1,822 for training
# + 1 for validation), so the run sees its data ~1.55 times (the loader wraps and logs each new epoch). Lower
# --target-param-data-ratio for a single pass.
# Extra arguments go to nc-train, e.g. scripts/run7b.sh --num-iterations=100
source "$(dirname "$0")/common.sh"
build
prepare_data 1822
plan_and_train --depth 52 --device-batch-size 24 --total-batch-size 393216 --model-tag 7b -- "$@"
