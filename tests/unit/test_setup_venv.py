"""scripts/setup_venv.sh without a package index: detected (pip cannot reach its index) or asked
for (OFFLINE=1), it installs megatron-wsm with --no-index --no-deps --no-build-isolation on top
of what the machine has and checks the requirements and imports, or says what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"
#: An index nobody answers on: pip's one query fails at once.
NO_INDEX = {
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_FIND_LINKS": "",
    "PIP_EXTRA_INDEX_URL": "",
}


def _source(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    full.pop("OFFLINE", None)
    return subprocess.run(
        ["bash", "-c", "source scripts/setup_venv.sh && echo SETUP-DONE"],
        cwd=cwd,
        env=full | NO_INDEX | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _base_python_without_torch() -> Path:
    probe = subprocess.run([str(BASE_PYTHON), "-c", "import pip, torch"], capture_output=True)
    if not BASE_PYTHON.exists() or probe.returncode == 0:
        pytest.skip("needs a base Python with pip and without torch")
    return BASE_PYTHON


def test_offline_is_detected_and_needs_a_python_with_torch(tmp_path):
    python = _base_python_without_torch()
    proc = _source(ROOT, PYTHON=str(python), VENV=str(tmp_path / "venv"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "SETUP-DONE" not in out
    assert "pip cannot reach its package index: offline setup" in out
    assert "does not import torch" in out
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow  # an editable install and a megatron-core import: ~30 s on a busy machine
def test_offline_setup_on_preinstalled_packages(tmp_path):
    # A machine with everything preinstalled: a venv that sees this checkout's .venv packages
    # (what --system-site-packages gives in a container), and a copy of the checkout.
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    venv = tmp_path / "venv"
    subprocess.run(
        [str(_base_python_without_torch()), "-m", "venv", "--without-pip", str(venv)], check=True
    )
    (
        venv
        / "lib"
        / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        / "site-packages"
        / "preinstalled.pth"
    ).write_text(f"{site}\n")
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "setup.py", "pyproject.toml", "megatron_wsm", "scripts/setup_venv.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())

    # an extra whose packages are not there: said, and refused
    proc = _source(src, VENV=str(venv), EXTRAS="gpu")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "pip cannot reach its package index: offline setup" in out
    assert "offline: not installed: transformer-engine[pytorch]" in out

    proc = _source(src, VENV=str(venv), EXTRAS="dev", OFFLINE="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SETUP-DONE" in out, out
    assert "package index" not in out  # OFFLINE=1: not even asked
    assert "offline: installing megatron-wsm (.[dev]) without dependencies" in out
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import megatron_wsm; print(megatron_wsm.__file__)"],
        cwd=tmp_path,  # not the checkout: `python -c` imports from the working directory first
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == src / "megatron_wsm" / "__init__.py"
    # the packages it stood on are untouched
    assert any(p.name.startswith("megatron_wsm-") for p in site.iterdir())
