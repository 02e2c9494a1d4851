"""The trainer under hostile conditions (issue 24, items 2 and 3): a second trainer on the same
``--save``, and a step whose loss and gradients go non-finite."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint.layout import TRACKER_FILE, list_checkpoints
from megatron_wsm.checkpoint.lock import LOCK_NAME
from megatron_wsm.testing.launch import run_script, run_until_exit, start_script
from tests.helpers import TINY_MODEL

pytestmark = pytest.mark.distributed


def _args(save: Path, data_cache: str, iters: int, *extra: str) -> list[str]:
    return [*TINY_MODEL, "--train-iters", str(iters), "--save", str(save),
            "--data-cache-dir", data_cache, *extra]


def test_second_trainer_on_one_save_is_refused_and_sigkill_frees_it(data_cache, tmp_path):
    save = tmp_path / "ckpt"
    first = start_script("pretrain_moe.py", _args(save, data_cache, 100000, "--save-interval",
                                                   "50"), tmp_path / "first.log")
    try:
        deadline = time.time() + 120
        lock = save / LOCK_NAME
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first trainer never took the lock"
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        second = run_script("pretrain_moe.py", _args(save, data_cache, 4, "--save-interval",
                                                      "1", "--seed", "7"), check=False)
        # torchrun exits 1 when a worker fails; the worker's own code (2: refused) is in its log.
        assert second.returncode != 0 and "exitcode  : 2" in second.stderr, second.stderr[-3000:]
        assert "is in use by another trainer" in second.stderr
        assert f"PID {holder['pid']}" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL the launcher, then its whole session (the trainer rank)
        run_until_exit(first, timeout=60)
    # SIGKILL released the lock: the next run takes over, saying so, and trains.
    third = run_script("pretrain_moe.py", _args(save, data_cache, 2, "--save-interval", "1"))
    assert "took over the stale trainer lock" in third.stdout + third.stderr
    assert {1, 2} <= {c.iteration for c in list_checkpoints(save) if c.complete}


def test_non_finite_step_is_not_applied_nor_saved(data_cache, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_script("pretrain_moe.py", _args(
        save, data_cache, 12, "--lr", "1e4", "--lr-warmup-iters", "0", "--save-interval", "1",
        "--wsm-interval", "1", "--wsm-window", "3"), check=False)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: iteration "))
    bad = int(line.split()[2].rstrip(":"))
    assert "not finite" in line or "the loss is nan" in line
    assert "the newest checkpoint is the last good one" in line
    # Every checkpoint on disk precedes the bad step and holds finite weights; the tracker
    # points at the last good full checkpoint.
    full = [c for c in list_checkpoints(save) if c.complete]
    window = [c for c in list_checkpoints(save / "wsm_window") if c.complete]
    assert full and window
    assert max(c.iteration for c in full + window) == bad - 1
    assert int((save / TRACKER_FILE).read_text()) == bad - 1
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    for ckpt in (full[-1].path, window[-1].path):
        md = FileSystemReader(str(ckpt)).read_metadata()
        wanted = {k: torch.empty(v.size, dtype=v.properties.dtype)
                  for k, v in md.state_dict_metadata.items()
                  if k.startswith("decoder.") and hasattr(v, "size") and v.properties.dtype
                  in (torch.float32, torch.bfloat16)}
        dcp.load(wanted, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
        assert wanted and all(bool(torch.isfinite(t).all()) for t in wanted.values()), ckpt


def test_checkpoint_files_follow_the_umask(data_cache, tmp_path):
    """What the trainer publishes (checkpoints, window, tracker, lock) has the modes a plain
    ``open`` / ``mkdir`` gives under the user's umask (issue 25, item 4): 027 here, so a
    group-readable run directory stays group-readable and nothing is world-readable."""
    import os
    import stat

    save = tmp_path / "ckpt"
    old = os.umask(0o027)
    try:
        run_script("pretrain_moe.py", _args(save, data_cache, 2, "--save-interval", "2",
                                            "--wsm-interval", "1", "--wsm-window", "2"))
    finally:
        os.umask(old)
    wrong = []
    for path in [save, *save.rglob("*")]:
        want = 0o750 if path.is_dir() else 0o640
        if stat.S_IMODE(path.stat().st_mode) != want:
            wrong.append(f"{path.relative_to(tmp_path)} {oct(stat.S_IMODE(path.stat().st_mode))}")
    assert not wrong, wrong
    assert (save / "iter_0000002").is_dir() and (save / "wsm_window" / "iter_0000002").is_dir()
    # The full checkpoint's common state carries Megatron-LM's args with the data position
    # (issue 28): its loader resumes the sampler from consumed_train_samples.
    import argparse

    from megatron_wsm.checkpoint.common_state import allowed_globals

    with allowed_globals([argparse.Namespace]):
        common = torch.load(save / "iter_0000002" / "common.pt", weights_only=True)
    assert common["args"].consumed_train_samples == common["consumed_samples"] == 8
    assert common["args"].iteration == 2
    # Megatron-LM's tracker in both roots: its --load of the window root finds the newest one.
    assert (save / "wsm_window" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
