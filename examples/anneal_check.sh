#!/usr/bin/env bash
# Real check of the annealing planner (docs/annealing.md): tiny MoE runs on the embedded corpus,
# the law fitted on a constant-LR run and one WSD run, held-out runs predicted.
#
#   bash examples/anneal_check.sh                 # runs in /tmp/anneal, ~2 min per run on 1 core
#   OUT=/tmp/x SKIP_EXISTING=1 bash examples/anneal_check.sh   # reuse runs already there
#
# Writes $OUT/{const,wsd20,wsd40,cosine,wsd5}/ (TensorBoard), $OUT/fit.json, $OUT/plan.json and
# docs/annealing_fit.png. Runs are sequential and single-threaded on purpose (shared machines).
set -euo pipefail

PYTHON=${PYTHON:-python}  # default: the environment examples/use_env.sh finds (.venv)
OUT=${OUT:-/tmp/anneal}
DATA=${DATA:-/tmp/anneal_data}
PLOT=${PLOT:-docs/annealing_fit.png}
cd "$(dirname "$0")/.."
. examples/use_env.sh  # .venv unless an environment with the package is active
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

COMMON=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4
        --seq-length 128 --micro-batch-size 8 --global-batch-size 8 --train-iters 600
        --lr 3e-3 --lr-warmup-iters 30 --log-interval 50 --eval-interval 0
        --no-progress-bar --no-moe-metrics --data-cache-dir "$DATA")

train() {  # train NAME FLAGS...: one run, TensorBoard logs in $OUT/NAME
    local name=$1
    shift
    if [[ -n "${SKIP_EXISTING:-}" && -d "$OUT/$name" ]]; then
        echo "== $name: exists, skipped"
        return
    fi
    rm -rf "${OUT:?}/$name"
    echo "== $name: $*"
    "$PYTHON" pretrain_moe.py "${COMMON[@]}" --tensorboard-dir "$OUT/$name" "$@" \
        > "$OUT/$name.log" 2>&1
    tail -n 2 "$OUT/$name.log"
}

WSD=(--lr-decay-style WSD --lr-wsd-decay-style 1-sqrt --min-lr 3e-5)
train const --lr-decay-style stable
train wsd20 "${WSD[@]}" --lr-wsd-decay-iters 120
train wsd40 "${WSD[@]}" --lr-wsd-decay-iters 240
train cosine --lr-decay-style cosine --min-lr 3e-5
train wsd5 "${WSD[@]}" --lr-wsd-decay-iters 30

# Fit on const + wsd20, predict the held-out runs (their MAPE lands in fit.json).
"$PYTHON" tools/plan_anneal.py --fit "$OUT/const" "$OUT/wsd20" \
    --predict "$OUT/wsd40" "$OUT/cosine" "$OUT/wsd5" \
    --output-json "$OUT/fit.json" --plot "$PLOT"

# What-if schedules and the best decay ratio / merge window for the same token budget.
"$PYTHON" tools/plan_anneal.py --fit "$OUT/const" "$OUT/wsd20" \
    --schedule constant cosine wsd:ratio=0.05 wsd:ratio=0.2 wsd:ratio=0.4 \
    merge:window=0.2,method=1-sqrt merge:window=0.2,method=mean \
    merge:window=0.2,method=1-sqrt,interval=120 \
    --min-lr 3e-5 --budget-tokens 614400 --output-json "$OUT/plan.json"
