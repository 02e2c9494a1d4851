#!/usr/bin/env bash
# Train the tiny MoE on the embedded corpus on one machine (CPU: gloo; GPU: nccl + TE if present)
# at a stable LR, saving a WSM window. Settings are variables; override them from the env.
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/use_env.sh  # .venv unless an environment with the package is active
NPROC=${NPROC:-2}
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-2}
ITERS=${ITERS:-200}
OUT=${OUT:-runs/tiny}
SP_FLAG=""; if [ "$TP" -gt 1 ]; then SP_FLAG="--sequence-parallel"; fi
exec torchrun --nproc-per-node "$NPROC" pretrain_moe.py \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --expert-model-parallel-size "$EP" $SP_FLAG \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 --moe-router-topk 2 \
    --seq-length 128 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-5 --lr-warmup-iters 20 --lr-decay-style stable \
    --save "$OUT/ckpt" --save-interval 100 --save-keep-last 2 \
    --wsm-interval 20 --wsm-window 80 \
    --tensorboard-dir "$OUT/tb" --log-interval 10 --eval-interval 100 --eval-iters 5 \
    --data-cache-dir data_cache "$@"
