#!/usr/bin/env bash
# Multi-node training with torchrun rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/train_multinode.sh   (on node0)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/train_multinode.sh   (on node1)
# examples/train.slurm does this under Slurm. OUT (the checkpoints) must be on a filesystem every
# node sees; the data cache may be node-local (rank 0 builds it and ships the index files).
#
# Defaults, for GPU nodes: a 384 M-parameter MoE (12 layers, hidden 768, 8 experts top-2,
# ~117 M active per token), bf16, sequences of 1024 tokens, one process per GPU of the node (2
# processes on a machine without GPUs), on the env-python corpus (docs/data.md; built once).
# Every size is a variable below; the derived ones stay consistent with the launch:
#   DP = NNODES × NPROC_PER_NODE / (TP × PP), EP = gcd(NUM_EXPERTS, DP) unless given,
#   GLOBAL_BATCH = MICRO_BATCH × DP × GRAD_ACCUM unless given.
# Arguments are passed to pretrain_moe.py after ours (for a flag given twice, the last one wins).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/use_env.sh  # .venv unless an environment with the package is active

# ---- launch ----
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${GPUS:-0}" -gt 0 ] && echo "$GPUS" || echo 2)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# ---- parallel layout ----
TP=${TP:-1}
PP=${PP:-1}
WORLD=$((NNODES * NPROC_PER_NODE))
if [ $((WORLD % (TP * PP))) != 0 ]; then
    echo "$0: world size $WORLD (NNODES × NPROC_PER_NODE) is not divisible by TP × PP = $TP × $PP" >&2
    exit 2
fi
DP=$((WORLD / (TP * PP)))
# ---- model ----
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-768}
NUM_HEADS=${NUM_HEADS:-12}
NUM_QUERY_GROUPS=${NUM_QUERY_GROUPS:-4}
NUM_EXPERTS=${NUM_EXPERTS:-8}
TOPK=${TOPK:-2}
MOE_FFN_HIDDEN_SIZE=${MOE_FFN_HIDDEN_SIZE:-1536}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
BF16=${BF16:-1}                      # 0: fp32
gcd() { local a=$1 b=$2; while [ "$b" -gt 0 ]; do set -- "$b" $((a % b)); a=$1 b=$2; done; echo "$a"; }
EP=${EP:-$(gcd "$NUM_EXPERTS" "$DP")}
# ---- batch, schedule, WSM window ----
MICRO_BATCH=${MICRO_BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-$((MICRO_BATCH * DP * GRAD_ACCUM))}
ITERS=${ITERS:-1000}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-50}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
WSM_INTERVAL=${WSM_INTERVAL:-50}
WSM_WINDOW=${WSM_WINDOW:-400}
DATA_ARGS=${DATA_ARGS:-"--data-source env-python --vocab-size 16384 --data-cache-dir data_cache"}
OUT=${OUT:-runs/multinode}

# megatron-core's TP/SP communication overlap needs one CUDA work queue (as Megatron-LM's scripts).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FLAGS=()
if [ "$TP" -gt 1 ]; then FLAGS+=(--sequence-parallel); fi
if [ "$BF16" = 1 ]; then FLAGS+=(--bf16); fi
# shellcheck disable=SC2206
CMD=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_moe.py
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP" "${FLAGS[@]}"
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS"
    --num-query-groups "$NUM_QUERY_GROUPS" --num-experts "$NUM_EXPERTS"
    --moe-router-topk "$TOPK" --moe-ffn-hidden-size "$MOE_FFN_HIDDEN_SIZE"
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH" $DATA_ARGS
    --train-iters "$ITERS" --lr "$LR" --lr-decay-style stable --lr-warmup-iters "$WARMUP"
    --save "$OUT/ckpt" --save-interval "$SAVE_INTERVAL" --save-keep-last 2 --async-save
    --wsm-interval "$WSM_INTERVAL" --wsm-window "$WSM_WINDOW" --wsm-async
    --tensorboard-dir "$OUT/tb" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf 'CUDA_DEVICE_MAX_CONNECTIONS=%s' "$CUDA_DEVICE_MAX_CONNECTIONS"
    printf ' %q' "${CMD[@]}"
    echo
    exit 0
fi
exec "${CMD[@]}"
