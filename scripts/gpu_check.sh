#!/usr/bin/env bash
# One prepared check for a GPU machine (1 x H100/H200, about 10 minutes), e.g. an NGC PyTorch
# container. Installs megatron-wsm into the machine's Python (on top of its CUDA torch /
# Transformer Engine / apex), runs tests/gpu, a short bf16 + distributed-optimizer +
# grouped-GEMM training run with async window saves, and bench/train_throughput.py, and
# writes everything under $OUT (default ./gpu_check_out):
#   env.txt           versions: python, torch, CUDA, TE, apex, megatron-core, GPU
#   fusions.json      which fusions megatron-wsm turned on (model.decide_fusions)
#   pytest_gpu.txt    tests/gpu output;  pytest_gpu.xml  junit
#   train.json        the training run's --output-json; train.log its log
#   throughput.json   tokens/s, ours vs bare megatron-core (goal: ratio >= 0.98)
# Each step's exit status goes to status.txt; the script returns non-zero if any failed.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONWARNINGS=ignore
: >"$OUT/status.txt"
step() {  # step NAME TIMEOUT_S CMD...
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
    return 0
}

step install 240 "$PY" -m pip install -q -e ".[dev]" >"$OUT/install.log" 2>&1
"$PY" - >"$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("megatron-core", "transformer_engine", "transformer-engine", "apex"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PYEOF
"$PY" -c "import json; from megatron_wsm import model as m; \
print(json.dumps({'spec': m.layer_spec_name(), **m.decide_fusions(m.probe_fusion_kernels())}))" \
    >"$OUT/fusions.json" 2>>"$OUT/env.txt"

step pytest_gpu 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
    --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.txt" 2>&1

MODEL=(--num-layers 4 --hidden-size 1024 --num-attention-heads 16 --num-experts 8
    --moe-router-topk 2 --moe-ffn-hidden-size 2048 --seq-length 1024 --micro-batch-size 4
    --global-batch-size 16 --vocab-size 4096 --data-cache-dir "$OUT/data_cache")
step train 240 "$PY" pretrain_moe.py "${MODEL[@]}" --bf16 --moe-grouped-gemm \
    --use-distributed-optimizer --train-iters 30 --log-interval 5 --eval-interval 0 \
    --save "$OUT/ckpt" --save-interval 30 --wsm-interval 5 --wsm-window 20 --wsm-async \
    --no-progress-bar --output-json "$OUT/train.json" >"$OUT/train.log" 2>&1

step throughput 240 "$PY" bench/train_throughput.py --rounds 4 --steps 5 \
    --json "$OUT/throughput.json" "${MODEL[@]}" --bf16 --moe-grouped-gemm \
    --use-distributed-optimizer >"$OUT/throughput.log" 2>&1
rm -rf "$OUT/ckpt" "$OUT/data_cache"  # large; the JSON results are what come back
cat "$OUT/status.txt"
! grep -qv " rc=0 " "$OUT/status.txt"
