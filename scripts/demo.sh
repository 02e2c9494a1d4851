#!/usr/bin/env bash
# The main job on the embedded default, end to end, on CPU (≈ 3 min on 2 cores):
#   1. set up .venv (if missing) and the package,
#   2. build the tokenizer + indexed datasets from the corpus that ships with Python,
#   3. train a tiny MoE with torchrun on 2 processes, EP=2, at a stable LR, saving a WSM window,
#   4. merge the window with the 1-sqrt decay's coefficients (2 merge ranks),
#   5. evaluate the stable checkpoint and the merged one on the held-out split (the trainer
#      also read the merged window out itself at every evaluation: --wsm-eval-methods),
#   6. print where the TensorBoard logs are.
# Variables: OUT (runs/demo), ITERS (300), NPROC (2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-runs/demo}
ITERS=${ITERS:-300}
NPROC=${NPROC:-2}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== train: $ITERS iterations, stable LR, window checkpoint every 10 iterations, window of 50"
torchrun --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29531}" pretrain_moe.py \
    --expert-model-parallel-size 2 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 --moe-router-topk 2 \
    --seq-length 128 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters "$ITERS" --lr 3e-3 --lr-warmup-iters 30 --lr-decay-style stable \
    --save "$OUT/ckpt" --save-interval "$ITERS" \
    --wsm-interval 10 --wsm-window 50 --wsm-eval-methods 1-sqrt \
    --tensorboard-dir "$OUT/tb" --log-interval 25 --eval-interval 100 --eval-iters 8 \
    --data-cache-dir data_cache --no-progress-bar --output-json "$OUT/stable.json"

echo "== the saved window"
python tools/list_checkpoints.py "$OUT/ckpt/wsm_window"

echo "== merge the window (1-sqrt decay emulated by checkpoint averaging)"
torchrun --nproc-per-node 2 --master-port "${MASTER_PORT2:-29532}" tools/merge_wsm.py \
    --load-dir "$OUT/ckpt/wsm_window" --method 1-sqrt --save "$OUT/merged_1sqrt"

echo "== evaluate the merged checkpoint"
python tools/evaluate.py --load "$OUT/merged_1sqrt" --eval-iters 8 \
    --data-cache-dir data_cache --output-json "$OUT/merged.json"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
stable = json.load(open(f"{out}/stable.json"))
# The trainer's own readout of the same window at its last evaluation (--wsm-eval-methods):
# the merge built in memory; it matches the merge written to disk and evaluated.
live = [r for r in stable.get("wsm_readouts", []) if "loss" in r]
rows = [("stable (last iterate)", stable),
        ("WSM merge, 1-sqrt", json.load(open(f"{out}/merged.json")))]
if live:
    rows.append((f"readout in training @{live[-1]['iteration']}", live[-1]))
print()
print(f"{'checkpoint':24s} {'eval loss':>10s} {'ppl':>9s} {'max vio':>8s} {'min vio':>8s}")
for name, r in rows:
    moe = r.get("moe") or {}
    print(f"{name:24s} {r['loss']:10.4f} {r['perplexity']:9.2f} "
          f"{moe.get('mean_global_max_violation', float('nan')):8.4f} "
          f"{moe.get('mean_global_min_violation', float('nan')):8.4f}")
PY
echo
echo "TensorBoard logs: $(cd "$OUT/tb" && pwd)   (tensorboard --logdir $OUT/tb)"
