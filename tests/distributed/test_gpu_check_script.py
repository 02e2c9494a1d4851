"""scripts/gpu_check.sh (the README's one prepared GPU check) runs end to end on CPU with a tiny
model: on a machine without CUDA tests/gpu skip themselves, and the bf16 + distributed-optimizer
+ async-window-save training and the throughput bench run on gloo. What it returns (status
lines, summary.json, the log archive) is what a GPU session reads back; it fits one time budget,
returns what it finished when it is killed half way, and builds megatron-core's dataset helper
when the install lacks it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, _env

pytestmark = pytest.mark.distributed

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
    "--moe-router-topk 2 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 "
    "--vocab-size 512"
)
STEPS = [
    "helpers_installed",
    "probe_installed",
    "pytest_gpu_installed",
    "train_installed",
    "throughput_installed",
]
OWN_LIMITS = {"helpers": 120, "probe": 60, "pytest": 140, "train": 100, "throughput": 90}


def _script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return (
        _env()
        | {
            "OUT": str(tmp_path / "out"),
            "WORK": str(tmp_path / "work"),
            "PYTHON": sys.executable,
            "SKIP_INSTALL": "1",
            "GPU_CHECK_MODEL": TINY,
            "CUDA_VISIBLE_DEVICES": "",
        }
        | extra
    )


def _status(tmp_path: Path) -> list[dict[str, str]]:
    rows = []
    for line in (tmp_path / "out" / "status.txt").read_text().splitlines():
        name, *fields = line.split()
        rows.append({"name": name} | dict(f.split("=", 1) for f in fields))
    return rows


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


@pytest.mark.slow  # ~3 min on 2 cores
def test_gpu_check_script_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=_script_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = _status(tmp_path)
    assert [row["name"] for row in status] == STEPS
    assert all(row["rc"] == "0" for row in status)
    summary = _summary(tmp_path)
    assert summary["state"] == "done" and [s["name"] for s in summary["steps"]] == STEPS
    train = summary["train_installed"]
    assert len(train["losses"]) == 30
    assert [r["iteration"] for r in train["wsm_readouts"] if "loss" in r] == [20, 30]
    assert summary["throughput_installed"]["throughput_ratio"] > 0
    assert summary["fusions_installed"]["spec"] == "local"
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        names = tar.getnames()
    assert "./train_installed.log" in names and "./pytest_gpu_installed.txt" in names
    assert "megatron-core installed: 0." in (tmp_path / "out" / "env.txt").read_text()


def test_gpu_check_fits_its_time_budget(tmp_path):
    """One budget for the whole script: steps are cut to what is left, the rest skipped."""
    budget = 20  # the training alone takes longer on CPU
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_script_env(tmp_path, GPU_CHECK_BUDGET=str(budget)),
        timeout=budget + 120,
    )
    elapsed = time.monotonic() - t0
    assert elapsed < budget + 5, (elapsed, proc.stdout[-2000:])
    assert proc.returncode != 0  # cut / skipped steps fail the check
    status = _status(tmp_path)
    assert [row["name"] for row in status] == STEPS, status
    ran = [row for row in status if row["rc"] != "skipped"]
    assert status[: len(ran)] == ran  # once the budget is spent, every later step is skipped
    for row in ran:
        assert int(row["limit"]) <= min(OWN_LIMITS[row["name"].split("_")[0]], budget - 5)
    assert sum(int(row["seconds"]) for row in status) <= budget
    assert status[-1]["rc"] in ("skipped", "124")  # no time was left for the bench
    summary = _summary(tmp_path)
    assert summary["state"] == "done"
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert (tmp_path / "out" / "gpu_check.tgz").exists()


def _wait_for(predicate, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_gpu_check_killed_half_way_returns_its_finished_steps(tmp_path, sig):
    out, work = tmp_path / "out", tmp_path / "work"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=_script_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    step_group = None
    try:
        # the helper check is done (summary written) and the next step is running
        _wait_for(lambda: (out / "summary.json").exists() and (work / "step.pid").exists())
        step_group = int((work / "step.pid").read_text())
        if sig == signal.SIGTERM:
            proc.send_signal(sig)  # the script alone, as `kill` or a time limit sends it
        else:
            os.killpg(proc.pid, sig)  # the script and its shell children, no say
        rc = proc.wait(timeout=60)
        summary = _summary(tmp_path)
        first = summary["steps"][0]
        assert first["name"] == "helpers_installed" and first["rc"] == 0, summary
        if sig == signal.SIGTERM:
            assert rc == 143
            assert summary["state"] == "killed"
            assert summary["steps"][-1]["rc"] == "killed"
            assert summary["steps"][-1]["name"] in STEPS[1:]
            _wait_for(lambda: not _group_alive(step_group), 30)  # the step was ended too
        else:
            assert rc == -signal.SIGKILL
            assert summary["state"] == "running"
            assert all(s["rc"] != "killed" for s in summary["steps"])
        with tarfile.open(out / "gpu_check.tgz") as tar:
            assert "./helpers_installed.log" in tar.getnames()
    finally:
        for group in (proc.pid, step_group):
            if group is not None and _group_alive(group):
                os.killpg(group, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.mark.slow  # compiles megatron-core's helpers.cpp (~15 s of CPU)
def test_gpu_check_builds_a_missing_dataset_helper(tmp_path):
    """A megatron-core without its compiled helper (a wheel for another Python) gets one built
    from the helpers.cpp it ships, where megatron-core imports it from."""
    spec = importlib.util.find_spec("megatron.core")
    copy = tmp_path / "mcore"
    shutil.copytree(
        Path(spec.submodule_search_locations[0]).parent,
        copy / "megatron",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    target = (
        copy / "megatron/core/datasets" / ("helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    )
    target.unlink()
    env = _script_env(tmp_path, GPU_CHECK_STEPS="helpers")
    env["PYTHONPATH"] = f"{copy}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [row["name"] for row in _status(tmp_path)] == ["helpers_installed"]
    log = (tmp_path / "work" / "helpers_installed.log").read_text()
    assert "helpers_cpp missing" in log and f"helpers_cpp built: {target}" in log
    loader = importlib.util.spec_from_file_location("helpers_cpp", target)
    helpers = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(helpers)
    index = np.zeros(5, dtype=np.int16)
    sample = np.zeros(5, dtype=np.int64)
    helpers.build_exhaustive_blending_indices(index, sample, np.array([2, 3], dtype=np.int64), 2)
    assert np.bincount(index).tolist() == [2, 3]
