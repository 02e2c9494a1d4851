"""scripts/gpu_check.sh (the README's one prepared GPU check) runs end to end on CPU with a tiny
model: on a machine without CUDA tests/gpu skip themselves, and the bf16 + distributed-optimizer
+ async-window-save training and the throughput bench run on gloo. What it returns (status
lines, summary.json, the log archive) is what a GPU session reads back."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import ROOT, _env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~3 min on 2 cores

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
        "--moe-router-topk 2 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 "
        "--vocab-size 512")


def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = _env() | {"OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
                    "PYTHON": sys.executable, "SKIP_INSTALL": "1", "GPU_CHECK_MODEL": TINY,
                    "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (tmp_path / "out" / "status.txt").read_text().splitlines()
    assert [line.split()[0] for line in status] == [
        "pytest_gpu_installed", "train_installed", "throughput_installed"]
    assert all(" rc=0 " in line for line in status)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    train = summary["train_installed"]
    assert len(train["losses"]) == 30
    assert [r["iteration"] for r in train["wsm_readouts"] if "loss" in r] == [20, 30]
    assert summary["throughput_installed"]["throughput_ratio"] > 0
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        names = tar.getnames()
    assert "./train_installed.log" in names and "./pytest_gpu_installed.txt" in names
