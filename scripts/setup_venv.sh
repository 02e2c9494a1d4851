#!/usr/bin/env bash
# Create .venv (if missing) and install megatron-wsm into it. Sourced by demo.sh and test.sh.
#   EXTRAS=dev   also install the test tools (pytest, hypothesis, ruff)
#   TORCH_SPEC   the torch to install first (default torch==2.13.0, the CPU build on machines
#                without CUDA; an unpinned torch pulls a multi-GB CUDA build)
set -euo pipefail
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
SPEC="."
if [ -n "${EXTRAS:-}" ]; then SPEC=".[${EXTRAS}]"; fi
echo "[setup] installing megatron-wsm ($SPEC) and its pinned dependencies"
python -m pip install -q -e "$SPEC"
