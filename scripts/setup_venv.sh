#!/usr/bin/env bash
# Create .venv (if missing) and install megatron-wsm into it. Sourced by demo.sh and test.sh.
#   EXTRAS=dev   also install the test tools (pytest, hypothesis, ruff)
#   TORCH_SPEC   the torch to install (default torch==2.13.0, the CPU build on machines
#                without CUDA). Setting it always wins: a plain venv, that torch installed.
#   PYTHON       the interpreter to build the venv from (default python3)
# When PYTHON already imports a CUDA build of torch (an NGC PyTorch container, a machine with
# a system-wide CUDA torch), and TORCH_SPEC is unset, the venv is made with
# --system-site-packages and that torch (with Transformer Engine / apex, when installed) is
# used as it is; pip then adds only megatron-wsm's own dependencies.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "${TORCH_SPEC:-}" ] &&
        "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
        echo "[setup] $PYTHON has a CUDA torch: creating $VENV on top of it (system site packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "[setup] creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC"
    python -m pip install -q "$TORCH_SPEC"
elif ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0"
    python -m pip install -q "torch==2.13.0"
else
    echo "[setup] using $(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
fi
SPEC="."
if [ -n "${EXTRAS:-}" ]; then SPEC=".[${EXTRAS}]"; fi
echo "[setup] installing megatron-wsm ($SPEC) and its pinned dependencies"
python -m pip install -q -e "$SPEC"
