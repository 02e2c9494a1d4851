#!/usr/bin/env bash
# One prepared check for a GPU machine (1 x H100/H200, one device call of under 10 minutes), e.g.
# an NGC PyTorch container. Runs, for each megatron-core under test, on top of the machine's own
# CUDA torch (and Transformer Engine / apex when installed):
#   megatron-core's compiled dataset helper (helpers_cpp: imported, else built from the
#   helpers.cpp its wheel ships), tests/gpu (pytest -m gpu), a short bf16 + distributed-optimizer
#   training with async window saves (+ grouped GEMM when TE is there), and
#   bench/train_throughput.py (first version only).
#
#   bash scripts/gpu_check.sh                      # machine with a registry: pip install -e .
#   MCORE_WHEELS=.whl bash scripts/gpu_check.sh    # offline: the oldest megatron_core-*.whl in
#                                                  # .whl, installed with --target into /tmp
#   MCORE_WHEELS=.whl MCORE_VERSIONS="0.16.1 0.19.2" GPU_CHECK_BUDGET=1100 bash scripts/gpu_check.sh
#                                                  # several wheels (MCORE_VERSIONS=all: every
#                                                  # one); give them the time they need
# GPU_CHECK_BUDGET (seconds, default 540: one version within a 590 s device call) is the time of
# the whole script: each step runs for at most min(its own limit, what is left of the budget
# less the time to pack the results); a step with no time left is recorded as skipped.
# GPU_CHECK_STEPS (default install,helpers,probe,pytest,train,throughput): the steps to run.
# On CPU (tests/gpu skip themselves) it runs too, e.g. as CI does with a tiny model:
#   SKIP_INSTALL=1 GPU_CHECK_MODEL="--num-layers 2 ..." bash scripts/gpu_check.sh
# Results under $OUT (default ./gpu_check_out): status.txt (one line per step: rc, seconds),
# env.txt (versions, GPU), summary.json (the steps, throughput ratio, losses), gpu_check.tgz
# (every log, pytest junit XML, training JSON). summary.json and the archive are rewritten after
# every step, so a run cut short (SIGTERM, SIGKILL, the device call's limit) returns the steps it
# finished. The script returns non-zero if any step failed or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
RESERVE=5  # seconds kept for packing the results after the last step
STEPS="${GPU_CHECK_STEPS:-install,helpers,probe,pytest,train,throughput}"
mkdir -p "$OUT" "$WORK"
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
CALLER_PYTHONPATH="${PYTHONPATH:-}"
: >"$OUT/status.txt"
rm -f "$OUT/summary.json" "$OUT/gpu_check.tgz"
# results of an earlier run in $WORK would be packed as this one's
rm -f "$WORK"/*.json "$WORK"/*.log "$WORK"/*.txt "$WORK"/*.xml "$WORK/step.pid"

# summary.json from status.txt and the JSON results under $WORK; then the log archive. Each is
# written beside and renamed, so a kill in between leaves the previous complete one.
cat >"$WORK/summarize.py" <<'PYEOF'
import glob, json, os, sys
work, status, out, state = sys.argv[1:]
summary = {"state": state, "steps": []}
for line in open(status).read().splitlines():
    name, *fields = line.split()
    step = {"name": name}
    for field in fields:
        key, _, value = field.partition("=")
        step[key] = int(value) if value.lstrip("-").isdigit() else value
    summary["steps"].append(step)
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
with open(out + ".tmp", "w") as f:
    json.dump(summary, f, indent=1, default=str)
os.replace(out + ".tmp", out)
PYEOF
pack() {  # pack STATE: summary.json + gpu_check.tgz as they stand
    "$PY" "$WORK/summarize.py" "$WORK" "$OUT/status.txt" "$OUT/summary.json" "$1" \
        || echo "{\"state\": \"$1\", \"error\": \"summary failed\"}" >"$OUT/summary.json"
    tar czf "$OUT/gpu_check.tgz.tmp" -C "$WORK" --exclude data_cache --exclude 'ckpt_*' \
        --exclude 'mcore-*' --exclude '*.tmp' . 2>/dev/null
    mv -f "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
}

CHILD=""
on_signal() {  # a cut run: stop the step, keep what is done
    trap - TERM INT
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null  # timeout passes it on to the step's process group
        wait "$CHILD" 2>/dev/null
    fi
    echo "${CURRENT:-script} rc=killed seconds=0" >>"$OUT/status.txt"
    pack killed
    exit 143
}
trap on_signal TERM INT

left() { echo $((BUDGET - SECONDS - RESERVE)); }
step() {  # step NAME TIMEOUT_S CMD...: run within the budget, record rc and seconds, pack
    local name="$1" own="$2"
    shift 2
    case ",$STEPS," in *",${name%%_*},"*) ;; *) return ;; esac  # not selected: not run
    local rest
    rest=$(left)
    local limit=$((own < rest ? own : rest))
    if [ "$limit" -lt 5 ]; then
        echo "$name rc=skipped seconds=0" | tee -a "$OUT/status.txt"
        pack running
        return
    fi
    local t0=$SECONDS
    CURRENT="$name"
    # In the background, so that a TERM to this script is handled while the step runs. timeout
    # puts the step in a process group of its own (to end it whole): its id is in step.pid for
    # whoever must clean up after a SIGKILL of this script.
    timeout -k 5 "$limit" "$@" &  # TERM at the limit, KILL 5 s later
    CHILD=$!
    echo "$CHILD" >"$WORK/step.pid"
    wait "$CHILD"
    local rc=$?
    CHILD=""
    CURRENT=""
    rm -f "$WORK/step.pid"
    echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$limit" | tee -a "$OUT/status.txt"
    pack running
}

cat >"$WORK/env.py" <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformer_engine", "transformer-engine", "apex", "triton", "pybind11"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PYEOF
envlimit=$(left)  # the versions: within the budget too
[ "$envlimit" -gt 60 ] && envlimit=60
[ "$envlimit" -lt 1 ] && envlimit=1
{
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout "$envlimit" "$PY" "$WORK/env.py"
} >"$OUT/env.txt" 2>&1
echo "budget ${BUDGET}s" >>"$OUT/env.txt"

# megatron-core's dataset index builder needs its C++ helper (megatron.core.datasets.helpers_cpp);
# a wheel without one for this Python fails every run at the first dataset build. Load it (from
# where megatron-core imports it, without importing megatron-core: seconds on a busy machine),
# else compile the helpers.cpp that megatron-core ships next to it (pybind11 headers from the
# pybind11 package, else the copy inside torch) and load it again.
cat >"$WORK/helpers_check.py" <<'PYEOF'
import importlib.util, os, subprocess, sys, sysconfig
spec = importlib.util.find_spec("megatron.core")
if spec is None:
    sys.exit("megatron-core is not importable")
src = os.path.join(spec.submodule_search_locations[0], "datasets")
target = os.path.join(src, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))

def load():
    try:
        module_spec = importlib.util.spec_from_file_location("helpers_cpp", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if hasattr(module, "build_sample_idx_int32") else "no build_sample_idx_int32"

problem = load() if os.path.exists(target) else "not there"
if problem is None:
    print("helpers_cpp present:", target)
    sys.exit(0)
print(f"helpers_cpp missing ({target}: {problem}): building it", flush=True)
try:
    import pybind11
    pybind_include = pybind11.get_include()
except ImportError:
    import torch
    pybind_include = os.path.join(os.path.dirname(torch.__file__), "include")
cmd = [os.environ.get("CXX", "g++"), "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC",
       "-I" + pybind_include, "-I" + sysconfig.get_paths()["include"],
       os.path.join(src, "helpers.cpp"), "-o", target]
print(" ".join(cmd), flush=True)
if subprocess.run(cmd).returncode != 0:
    sys.exit("building helpers_cpp failed")
problem = load()
if problem is not None:
    sys.exit(f"the helpers_cpp built does not load: {problem}")
print("helpers_cpp built:", target)
PYEOF

cat >"$WORK/probe.py" <<'PYEOF'
import json, sys
import megatron_wsm.mcore_prelude  # before megatron.core, as every module of the package does
import megatron.core.package_info as info
from megatron_wsm import model as m
from megatron_wsm.accelerators import layer_spec_name
print("megatron-core", sys.argv[1] + ":", info.__version__)
with open(sys.argv[2], "w") as f:
    json.dump({"spec": layer_spec_name(), **m.decide_fusions(m.probe_fusion_kernels())}, f)
PYEOF

# Which megatron-core installs to check: the wheels given (offline), else this checkout's pins.
versions=()
if [ -n "${MCORE_WHEELS:-}" ]; then
    available=$(for w in "$MCORE_WHEELS"/megatron_core-*.whl; do
        [ -e "$w" ] && basename "$w" | cut -d- -f2; done | sort -V)
    case "${MCORE_VERSIONS:-}" in
        "") wanted=$(echo "$available" | head -n 1) ;;  # the oldest: the project's baseline
        all) wanted="$available" ;;
        *) wanted="$MCORE_VERSIONS" ;;
    esac
    for ver in $wanted; do
        wheel=$(ls "$MCORE_WHEELS"/megatron_core-"$ver"-*.whl 2>/dev/null | head -n 1)
        if [ -z "$wheel" ]; then
            echo "install_mcore_$ver rc=nowheel seconds=0" | tee -a "$OUT/status.txt"
            continue
        fi
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
        export PYTHONPATH="$PWD${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
    else
        export PYTHONPATH="$WORK/mcore-$ver:$PWD${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
    fi
    step "helpers_$ver" 120 "$PY" "$WORK/helpers_check.py" >"$WORK/helpers_$ver.log" 2>&1
    tail -n 2 "$WORK/helpers_$ver.log" 2>/dev/null
    # which megatron-core, which layer spec and fusions
    step "probe_$ver" 60 "$PY" "$WORK/probe.py" "$ver" "$WORK/fusions_$ver.json" \
        >"$WORK/probe_$ver.log" 2>&1
    grep -hs "^megatron-core " "$WORK/probe_$ver.log" >>"$OUT/env.txt"

    step "pytest_gpu_$ver" 140 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
        "${XDIST[@]}" --junitxml="$WORK/pytest_gpu_$ver.xml" >"$WORK/pytest_gpu_$ver.txt" 2>&1
    tail -n 15 "$WORK/pytest_gpu_$ver.txt" 2>/dev/null

    step "train_$ver" 100 "$PY" pretrain_moe.py "${MODEL[@]}" "${FAST[@]}" --train-iters 30 \
        --log-interval 5 --eval-interval 10 --eval-iters 2 --save "$WORK/ckpt_$ver" \
        --save-interval 30 --wsm-interval 5 --wsm-window 10 --wsm-async \
        --wsm-eval-methods 1-sqrt --no-progress-bar --output-json "$WORK/train_$ver.json" \
        >"$WORK/train_$ver.log" 2>&1
    tail -n 6 "$WORK/train_$ver.log" 2>/dev/null
    rm -rf "$WORK/ckpt_$ver"

    if [ "$first" = 1 ]; then
        step "throughput_$ver" 90 "$PY" bench/train_throughput.py --rounds 4 --steps 5 \
            --json "$WORK/throughput_$ver.json" "${MODEL[@]}" "${FAST[@]}" \
            >"$WORK/throughput_$ver.log" 2>&1
        tail -n 4 "$WORK/throughput_$ver.log" 2>/dev/null
        first=0
    fi
done

# What comes back: a few small files (the device tool returns at most 8).
pack done
cat "$OUT/status.txt"
! grep -qv " rc=0 " "$OUT/status.txt"
