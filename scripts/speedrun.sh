#!/usr/bin/env bash
# nanochat's speedrun model: depth 20 (561M parameters), 32 x 2048 tokens per GPU on 8 GPUs = 524,288 tokens per
# step, 20 tokens per parameter (11.2e9 tokens, 21,400 steps), 240 parquet shards; ~2.8 h on 8 x H100 at 50%
# MFU (`nc-train --plan --depth 20 --world-size 8 --gpu h100`). Fits in 80 GB without recomputation.
# Extra arguments go to nc-train, e.g. scripts/speedrun.sh --num-iterations=100
source "$(dirname "$0")/common.sh"
build
prepare_data 240
GPU="${GPU:-h100}"
plan_and_train --depth 20 --device-batch-size 32 --total-batch-size 524288 --model-tag d20 -- "$@"
