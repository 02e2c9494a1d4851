"""Checkpoint data safety under concurrent saves, kills and continued training (issue 12).

- a window and a full save at the same iteration (sync and async, 1 and 2 processes) each give a
  checkpoint whose ``.metadata`` describes its own shards (CRC-checked), and resuming from the
  full one is bitwise equal to not stopping;
- a rank killed at any point of an async save leaves nothing incomplete that is listed as
  complete, and the newest complete checkpoint resumes;
- a trainer killed with SIGKILL leaves no helper process (async writers, the results-queue
  Manager) behind.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.layout import list_checkpoints
from megatron_wsm.checkpoint.manager import CRASH_ENV
from megatron_wsm.testing.launch import run_script, run_until_exit, start_script
from tests.helpers import TINY_MODEL, _env, losses, run_pretrain

pytestmark = pytest.mark.distributed

MARKER_ENV = "MEGATRON_WSM_TEST_MARKER"


def _common(data_cache: str, nproc: int, async_saves: bool, iters: int = 12) -> list:
    args = [
        *TINY_MODEL,
        "--train-iters",
        str(iters),
        "--save-interval",
        "6",
        "--wsm-interval",
        "3",
        "--wsm-window",
        "6",
        "--data-cache-dir",
        data_cache,
    ]
    if nproc == 2:
        args += ["--expert-model-parallel-size", "2"]
    if async_saves:
        args += ["--wsm-async", "--async-save"]
    return args


def _assert_complete_ones_verify(save: Path) -> list[int]:
    """Every checkpoint listed as complete is consistent down to the CRC of each record;
    returns the iterations of the complete full checkpoints."""
    full = []
    for root in (save, save / "wsm_window"):
        for c in list_checkpoints(root):
            if c.complete:
                assert not c.path.name.startswith("."), c.path
                assert ckpt_integrity.verify(c.path, crc=True) == [], c.path
                if root == save:
                    full.append(c.iteration)
    return full


def _window_and_full_then_resume(data_cache: str, tmp_path: Path, nproc: int, async_saves: bool):
    common = _common(data_cache, nproc, async_saves)
    save = tmp_path / "a"
    straight = run_pretrain([*common, "--save", save], tmp_path / "a.json", nproc=nproc)
    assert _assert_complete_ones_verify(save) == [6, 12]
    windows = [c.iteration for c in list_checkpoints(save / "wsm_window") if c.complete]
    assert windows == [6, 9, 12]
    resumed = run_pretrain(
        [*common, "--save", tmp_path / "b", "--load", save / "iter_0000006"],
        tmp_path / "b.json",
        nproc=nproc,
    )
    assert [h["iteration"] for h in resumed["train_history"]] == list(range(7, 13))
    assert losses(resumed) == losses(straight)[6:]  # bitwise on CPU
    assert _assert_complete_ones_verify(tmp_path / "b") == [12]


def test_async_window_and_full_save_at_same_iteration_2proc(data_cache, tmp_path):
    """The reported corruption: --wsm-async with EP=2, window and full save at iteration 6."""
    _window_and_full_then_resume(data_cache, tmp_path, 2, async_saves=True)


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "async_saves"), [(1, False), (1, True), (2, False)])
def test_window_and_full_save_at_same_iteration(data_cache, tmp_path, nproc, async_saves):
    _window_and_full_then_resume(data_cache, tmp_path, nproc, async_saves)


# ----------------------------------------------------------------------------- kill -9


def _kill_during_async_save_then_resume(data_cache: str, tmp_path: Path, spec: str):
    common = _common(data_cache, 2, async_saves=True)
    straight = run_pretrain(
        [*common, "--save", tmp_path / "straight"], tmp_path / "straight.json", nproc=2
    )
    save = tmp_path / "ckpt"
    env = _env()
    env[CRASH_ENV] = spec  # rank 0 SIGKILLs itself at that point of that save
    returncode = run_until_exit(
        start_script("pretrain_moe.py", [*common, "--save", save], tmp_path / "crash.log", 2, env)
    )
    assert returncode != 0, (tmp_path / "crash.log").read_text()[-3000:]
    kind, iteration, _ = spec.split(":")
    root = save if kind == "full" else save / "wsm_window"
    killed = {c.iteration: c for c in list_checkpoints(root)}
    assert not killed[int(iteration)].complete  # the save that was killed is not complete
    full = _assert_complete_ones_verify(save)
    assert full, "the test needs a complete full checkpoint before the killed save"
    resumed = run_pretrain([*common, "--save", save, "--load", save], tmp_path / "r.json", nproc=2)
    first = full[-1] + 1
    assert [h["iteration"] for h in resumed["train_history"]] == list(range(first, 13))
    assert losses(resumed) == losses(straight)[first - 1 :]
    assert _assert_complete_ones_verify(save)[-1] == 12


#: (kind, iteration, point) of the killed save; iteration 6's full save comes first so that a
#: complete checkpoint exists to resume from.
KILL_POINTS = [
    "window:9:before-finalize",
    "window:9:before-write",
    "full:12:before-write",
    "full:12:before-finalize",
]


def test_kill_during_async_window_finalize_then_resume(data_cache, tmp_path):
    _kill_during_async_save_then_resume(data_cache, tmp_path, KILL_POINTS[0])


@pytest.mark.slow
@pytest.mark.parametrize("spec", KILL_POINTS[1:])
def test_kill_during_async_save_then_resume(data_cache, tmp_path, spec):
    _kill_during_async_save_then_resume(data_cache, tmp_path, spec)


# ----------------------------------------------------------------------------- orphans


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER_ENV) == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def _sigkill_trainer_and_look_for_survivors(
    data_cache: str, tmp_path: Path, delay: float, launcher_only: bool = False
):
    marker = uuid.uuid4().hex
    env = _env()
    env[MARKER_ENV] = marker
    args = [
        *_common(data_cache, 2, async_saves=True, iters=400),
        "--save-interval",
        "2",
        "--wsm-interval",
        "1",
        "--save",
        tmp_path / "ckpt",
    ]
    log_path = tmp_path / "train.log"
    proc = start_script("pretrain_moe.py", args, log_path, 2, env)
    survivors: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while "saved full checkpoint" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no save within 240 s"
            time.sleep(0.2)
        time.sleep(delay)  # land somewhere in the stream of async saves
        launcher = psutil.Process(proc.pid)
        ranks = launcher.children()  # torchrun's own children are the rank processes
        assert ranks
        # Killing torchrun alone must take its ranks down too (they die with their launcher).
        for p in [launcher] if launcher_only else [launcher, *ranks]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            survivors = _marked(marker)
            if not survivors:
                break
            time.sleep(0.5)
    finally:
        for p in _marked(marker):  # never leave anything behind, even when the test fails
            try:
                p.kill()
            except psutil.Error:
                pass
    described = []
    for p in survivors:
        try:
            described.append((p.pid, p.ppid(), " ".join(p.cmdline())[:120]))
        except psutil.Error:
            continue  # died between the last look and now
    assert not described, f"helper processes outlived the killed trainer: {described}"
    _assert_complete_ones_verify(tmp_path / "ckpt")


def test_sigkilled_trainer_leaves_no_helper_process(data_cache, tmp_path):
    _sigkill_trainer_and_look_for_survivors(data_cache, tmp_path, delay=0.5)


def test_sigkilled_torchrun_takes_its_ranks_and_helpers_down(data_cache, tmp_path):
    _sigkill_trainer_and_look_for_survivors(data_cache, tmp_path, delay=0.5, launcher_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.3, 2.1, 3.7])
def test_sigkilled_trainer_leaves_no_helper_process_loop(data_cache, tmp_path, delay):
    _sigkill_trainer_and_look_for_survivors(data_cache, tmp_path, delay)


class _RunsCode:
    """A pickle that creates a file when unpickled (a crafted ``.metadata``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_trainer_refuses_to_load_bit_rot_and_crafted_metadata(data_cache, tmp_path):
    import pickle
    import shutil

    save = tmp_path / "ckpt"
    args = [*TINY_MODEL, "--train-iters", "2", "--data-cache-dir", data_cache,
            "--expert-model-parallel-size", "2"]
    run_pretrain([*args, "--save", save], tmp_path / "a.json", nproc=2)
    ckpt = save / "iter_0000002"
    assert ckpt_integrity.verify(ckpt, crc=True) == []

    def resume(load: Path) -> subprocess.CompletedProcess:
        return run_script(
            "pretrain_moe.py", [*args, "--train-iters", "3", "--load", load], 2, check=False
        )

    # A flipped bit in the last shard file (checked by rank 1 of 2) is refused by name.
    rot = tmp_path / "rot"
    shutil.copytree(ckpt, rot)
    md = ckpt_integrity.load_metadata(rot)
    last = ckpt_integrity.shard_files(md)[-1]
    index, info = next(
        (i, s) for i, s in md.storage_data.items()
        if s.relative_path == last and "weight" in i.fqn and s.length > 4096
    )
    data = bytearray((rot / last).read_bytes())
    data[info.offset + info.length - 1024] ^= 0x04
    (rot / last).write_bytes(bytes(data))
    proc = resume(rot)
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "CRC-32 mismatch" in proc.stderr, proc.stderr
    assert last in proc.stderr

    # A crafted .metadata is refused before megatron-core unpickles it: no code runs.
    crafted = tmp_path / "crafted"
    shutil.copytree(ckpt, crafted)
    marker = tmp_path / "PWNED"
    with open(crafted / ckpt_integrity.METADATA_FILE, "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    proc = resume(crafted)
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "unsafe" in proc.stderr, proc.stderr
    assert not marker.exists()
