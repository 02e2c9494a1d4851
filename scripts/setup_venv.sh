#!/usr/bin/env bash
# Create .venv (if missing) and install megatron-wsm into it. Sourced by demo.sh and test.sh.
#   EXTRAS=dev   also install the test tools (pytest, hypothesis, ruff)
#   TORCH_SPEC   the torch to install (default torch==2.13.0, the CPU build on machines
#                without CUDA). Setting it always wins: a plain venv, that torch installed.
#   PYTHON       the interpreter to build the venv from (default python3)
#   OFFLINE=1    no package index (a machine or container with everything preinstalled):
#                nothing is downloaded; the venv is made on top of PYTHON's packages
#                (--system-site-packages), megatron-wsm is installed with --no-index --no-deps
#                --no-build-isolation, then its requirements (and EXTRAS') and imports are
#                checked. Unset: offline when pip cannot reach its package index (one quick
#                query); OFFLINE=0: always online.
# When PYTHON already imports a CUDA build of torch (an NGC PyTorch container, a machine with
# a system-wide CUDA torch), and TORCH_SPEC is unset, the venv is made with
# --system-site-packages and that torch (with Transformer Engine / apex, when installed) is
# used as it is; pip then adds only megatron-wsm's own dependencies.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
SPEC="."
if [ -n "${EXTRAS:-}" ]; then SPEC=".[${EXTRAS}]"; fi

_setup_offline="${OFFLINE:-}"
if [ -z "$_setup_offline" ]; then
    # Can pip reach its index (PIP_INDEX_URL / pip.conf)? One query, no retries.
    _setup_pip="$PYTHON"
    [ -x "$VENV/bin/python" ] && _setup_pip="$VENV/bin/python"
    if ! "$_setup_pip" -m pip index --help >/dev/null 2>&1 ||  # no pip, or one too old to ask
        timeout 30 "$_setup_pip" -m pip index versions pip --timeout 5 --retries 0 \
            --disable-pip-version-check >/dev/null 2>&1; then
        _setup_offline=0
    else
        echo "[setup] pip cannot reach its package index: offline setup (OFFLINE=0 to force online)"
        _setup_offline=1
    fi
fi

if [ "$_setup_offline" = 1 ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
            echo "[setup] offline, and $PYTHON does not import torch: nothing to build the venv on" >&2
            return 1 2>/dev/null || exit 1
        fi
        echo "[setup] offline: creating $VENV on top of $PYTHON's packages (system site packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    if [ -n "${TORCH_SPEC:-}" ]; then
        echo "[setup] offline: installing $TORCH_SPEC from local wheels (PIP_FIND_LINKS)"
        python -m pip install -q --no-index --disable-pip-version-check "$TORCH_SPEC"
    fi
    echo "[setup] offline: installing megatron-wsm ($SPEC) without dependencies"
    python -m pip install -q --no-index --no-deps --no-build-isolation \
        --disable-pip-version-check -e "$SPEC"
    # Every requirement of megatron-wsm (and of the EXTRAS asked for) must be there already.
    if ! python - "${EXTRAS:-}" <<'PYEOF'; then
import importlib.metadata as md, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
extras = [e for e in sys.argv[1].split(",") if e]
missing, other = [], []
for text in md.requires("megatron-wsm") or []:
    req = Requirement(text)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or [""]):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req))
        continue
    if not req.specifier.contains(have, prereleases=True):
        other.append(f"{req.name} {have} (wanted {req.specifier})")
for line in other:
    print(f"[setup] offline: using {line} as installed")
if missing:
    sys.exit("[setup] offline: not installed: " + ", ".join(missing))
PYEOF
        return 1 2>/dev/null || exit 1
    fi
    if ! python -c "import megatron_wsm.mcore_prelude, torch, megatron.core, megatron_wsm" >/dev/null 2>&1; then
        python -c "import megatron_wsm.mcore_prelude, torch, megatron.core, megatron_wsm" || true
        echo "[setup] offline: megatron-wsm does not import (above)" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "[setup] offline: using $(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
    return 0 2>/dev/null || exit 0
fi

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
echo "[setup] installing megatron-wsm ($SPEC) and its pinned dependencies"
python -m pip install -q -e "$SPEC"
