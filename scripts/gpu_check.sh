#!/usr/bin/env bash
# One prepared check for a GPU machine (1 x H100/H200, under 10 minutes), e.g. an NGC PyTorch
# container. Runs, for each megatron-core under test, on top of the machine's own CUDA torch
# (and Transformer Engine / apex when installed):
#   tests/gpu (pytest -m gpu), a short bf16 + distributed-optimizer training with async window
#   saves (+ grouped GEMM when TE is there), and bench/train_throughput.py (first version only).
#
#   bash scripts/gpu_check.sh                      # machine with a registry: pip install -e .
#   MCORE_WHEELS=.whl bash scripts/gpu_check.sh    # offline: one run per megatron_core-*.whl in
#                                                  # .whl, each installed with --target into /tmp
# On CPU (tests/gpu skip themselves) it runs too, e.g. as CI does with a tiny model:
#   SKIP_INSTALL=1 GPU_CHECK_MODEL="--num-layers 2 ..." bash scripts/gpu_check.sh
# Results under $OUT (default ./gpu_check_out): status.txt (one line per step: rc, seconds),
# env.txt (versions, GPU), summary.json (throughput ratio, losses), gpu_check.tgz (every log,
# pytest junit XML, training JSON). The script returns non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/gpu_check}"
mkdir -p "$OUT" "$WORK"
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
: >"$OUT/status.txt"
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, record rc and seconds
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformer_engine", "transformer-engine", "apex", "triton"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PYEOF
} >"$OUT/env.txt" 2>&1

# Which megatron-core installs to check: the wheels given (offline), else this checkout's pins.
versions=()
if [ -n "${MCORE_WHEELS:-}" ]; then
    for wheel in "$MCORE_WHEELS"/megatron_core-*.whl; do
        ver=$(basename "$wheel" | cut -d- -f2)
        step "install_mcore_$ver" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --target "$WORK/mcore-$ver" "$wheel" >"$WORK/install_$ver.log" 2>&1
        versions+=("$ver")
    done
else
    # SKIP_INSTALL=1: megatron-wsm is installed already (CI runs this script on CPU that way)
    [ "${SKIP_INSTALL:-0}" = 1 ] \
        || step install 300 "$PY" -m pip install -q -e ".[dev]" >"$WORK/install.log" 2>&1
    versions+=("installed")
fi

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)  # tiny models: 4 test processes share the GPU
# GPU_CHECK_MODEL overrides the model (a tiny one lets CI run this script on CPU).
# shellcheck disable=SC2206
MODEL=(${GPU_CHECK_MODEL:---num-layers 4 --hidden-size 1024 --num-attention-heads 16 \
    --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 2048 --seq-length 1024 \
    --micro-batch-size 4 --global-batch-size 16 --vocab-size 4096}
    --data-cache-dir "$WORK/data_cache")
FAST=(--bf16 --use-distributed-optimizer)
"$PY" -c "import transformer_engine.pytorch" 2>/dev/null && FAST+=(--moe-grouped-gemm)

first=1
for ver in "${versions[@]}"; do
    if [ "$ver" = installed ]; then
        export PYTHONPATH="$PWD"
    else
        export PYTHONPATH="$WORK/mcore-$ver:$PWD"
    fi
    echo "megatron-core $ver: $("$PY" -c 'import megatron_wsm, megatron.core.package_info as p; print(p.__version__)' 2>&1 | tail -1)" >>"$OUT/env.txt"
    "$PY" -c "import json; from megatron_wsm import model as m; \
print(json.dumps({'spec': m.layer_spec_name(), **m.decide_fusions(m.probe_fusion_kernels())}))" \
        >"$WORK/fusions_$ver.json" 2>>"$OUT/env.txt"

    step "pytest_gpu_$ver" 140 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
        "${XDIST[@]}" --junitxml="$WORK/pytest_gpu_$ver.xml" >"$WORK/pytest_gpu_$ver.txt" 2>&1
    tail -n 15 "$WORK/pytest_gpu_$ver.txt"

    step "train_$ver" 100 "$PY" pretrain_moe.py "${MODEL[@]}" "${FAST[@]}" --train-iters 30 \
        --log-interval 5 --eval-interval 10 --eval-iters 2 --save "$WORK/ckpt_$ver" \
        --save-interval 30 --wsm-interval 5 --wsm-window 10 --wsm-async \
        --wsm-eval-methods 1-sqrt --no-progress-bar --output-json "$WORK/train_$ver.json" \
        >"$WORK/train_$ver.log" 2>&1
    tail -n 6 "$WORK/train_$ver.log"
    rm -rf "$WORK/ckpt_$ver"

    if [ "$first" = 1 ]; then
        step "throughput_$ver" 90 "$PY" bench/train_throughput.py --rounds 4 --steps 5 \
            --json "$WORK/throughput_$ver.json" "${MODEL[@]}" "${FAST[@]}" \
            >"$WORK/throughput_$ver.log" 2>&1
        tail -n 4 "$WORK/throughput_$ver.log"
        first=0
    fi
done

# What comes back: a few small files (the device tool returns at most 8).
"$PY" - "$WORK" "$OUT/summary.json" <<'PYEOF'
import glob, json, os, sys
work, out = sys.argv[1:]
summary = {}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    name = os.path.basename(path)[:-5]
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as exc:
        summary[name] = f"unreadable: {exc}"
        continue
    if name.startswith("train_"):
        data = {k: data.get(k) for k in ("loss", "moe", "wsm_readouts")} | {
            "losses": [h.get("loss") for h in data.get("train_history", [])]}
    summary[name] = data
json.dump(summary, open(out, "w"), indent=1, default=str)
PYEOF
tar czf "$OUT/gpu_check.tgz" -C "$WORK" --exclude data_cache --exclude 'ckpt_*' . 2>/dev/null
cat "$OUT/status.txt"
! grep -qv " rc=0 " "$OUT/status.txt"
