#!/usr/bin/env bash
# Multi-node training with torchrun rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/train_multinode.sh   (on node0)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/train_multinode.sh   (on node1)
# With NNODES=1 (the default) it is a single-machine run, which is how it is checked here.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-2}
DATA_ARGS=${DATA_ARGS:-"--data-cache-dir data_cache"}  # or: --data-path P --tokenizer-model M
OUT=${OUT:-runs/multinode}
ITERS=${ITERS:-1000}
SP_FLAG=""; if [ "$TP" -gt 1 ]; then SP_FLAG="--sequence-parallel"; fi
# shellcheck disable=SC2086
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_moe.py \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --expert-model-parallel-size "$EP" $SP_FLAG $DATA_ARGS \
    --train-iters "$ITERS" --lr-decay-style stable --lr-warmup-iters 50 \
    --save "$OUT/ckpt" --save-interval 500 --save-keep-last 2 --async-save \
    --wsm-interval 50 --wsm-window 400 --wsm-async \
    --tensorboard-dir "$OUT/tb" "$@"
