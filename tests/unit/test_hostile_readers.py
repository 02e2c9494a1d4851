"""Hostile files where a tool reads a checkpoint (issue 24, items 4-7): FIFOs and symlinks in
place of checkpoint files, a missing or unreadable common state, a directory whose name, manifest
and common state disagree on the iteration, and manifests that are valid JSON but not a manifest.

Every test builds the hostile checkpoint with torch DCP (no megatron-core start-up, no process
group) and runs the tool's own entry point; anything that could block (a FIFO) runs in a thread
with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint import layout
from megatron_wsm.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointManifest,
    read_manifest,
    write_manifest,
)
from megatron_wsm.cli import evaluate, list_checkpoints, merge_wsm
from megatron_wsm.merge import MergeError, inspect_input, select_window

#: Seconds a tool may take on a hostile file before the test calls it a hang.
HANG = 20.0


# ----------------------------------------------------------------------------- helpers


def _ckpt(path: Path, iteration: int, kind: str = "window", *, common_iteration: int | None = None,
          manifest_iteration: int | None = None) -> Path:
    """A small torch_dist checkpoint: DCP shards, ``common.pt`` and a complete manifest."""
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(64, dtype=torch.float32) + iteration, "b": torch.ones(3, 5)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    common = {"iteration": iteration if common_iteration is None else common_iteration,
              "checkpoint_version": 3.0}
    torch.save(common, path / ckpt_common.COMMON_FILE)
    it = iteration if manifest_iteration is None else manifest_iteration
    write_manifest(path, CheckpointManifest(kind=kind, iteration=it, consumed_tokens=it * 10,
                                            complete=True))
    return path


def _window(root: Path, iterations: tuple[int, ...] = (10, 20, 30)) -> list[Path]:
    return [_ckpt(root / layout.checkpoint_name(it), it) for it in iterations]


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _within(seconds: float, fn: Callable[[], Any], fifos: tuple[Path, ...] = ()) -> Any:
    """``fn()``'s result, or a test failure when it takes longer than ``seconds`` (a reader
    blocked on one of ``fifos`` is released by opening its write end, so nothing stays hung)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:  # unblock the reader (a FIFO open waits for a writer)
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"hung for more than {seconds}s (blocked on {', '.join(map(str, fifos))})")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _cli(main: Callable[[list[str]], int], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """evaluate.py's hand-over to the trainer, recorded instead of run: a checkpoint refused
    by the evaluation's own checks never gets there."""
    import megatron_wsm.pretrain

    calls: list[list[str]] = []

    def fake_main(argv: list[str], *args: Any, **kwargs: Any) -> int:
        calls.append(list(argv))
        return 0

    monkeypatch.setattr(megatron_wsm.pretrain, "main", fake_main)
    return calls


def _evaluate(*argv: str) -> tuple[int, str, str]:
    return _cli(evaluate.main, *argv)


def _list(*argv: str) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = _cli(list_checkpoints.main, *argv, "--json")
    return code, json.loads(out) if out.strip() else [], err


def _merge(*argv: str) -> tuple[int, str, str]:
    return _cli(merge_wsm.main, *argv)


# ----------------------------------------------------------------------------- 4: FIFOs


def test_fifo_in_place_of_metadata_is_refused_not_read(tmp_path):
    ckpt = _ckpt(tmp_path / "iter_0000010", 10)
    fifo = _fifo(ckpt / ckpt_integrity.METADATA_FILE)
    with pytest.raises(ckpt_integrity.IntegrityError, match=r"\.metadata.*FIFO"):
        _within(HANG, lambda: ckpt_integrity.load_metadata(ckpt), (fifo,))


def test_fifo_metadata_does_not_hang_list_verify(tmp_path):
    root = tmp_path / "run"
    good, bad, _ = _window(root)
    fifo = _fifo(bad / ckpt_integrity.METADATA_FILE)
    code, rows, _ = _within(HANG, lambda: _list(str(root), "--verify"), (fifo,))
    by_path = {Path(r["path"]).name: r for r in rows}
    assert code == list_checkpoints.EXIT_PROBLEMS
    assert not by_path[bad.name]["complete"] and "FIFO" in by_path[bad.name]["note"]
    assert by_path[good.name]["complete"] and by_path[good.name]["verify"] == "OK"


def test_fifo_metadata_does_not_hang_the_merge_load_dir(tmp_path):
    root = tmp_path / "run"
    _, bad, _ = _window(root)
    fifo = _fifo(bad / ckpt_integrity.METADATA_FILE)
    code, _, err = _within(HANG, lambda: _merge("--load-dir", str(root), "--method", "mean",
                                                "--save", str(tmp_path / "m"), "--dry-run"),
                           (fifo,))
    assert code == 2 and "FIFO" in err and bad.name in err


def test_fifo_metadata_is_refused_by_evaluate_load(tmp_path, no_training):
    ckpt = _ckpt(tmp_path / "iter_0000010", 10)
    fifo = _fifo(ckpt / ckpt_integrity.METADATA_FILE)
    code, _, err = _within(HANG, lambda: _evaluate("--load", str(ckpt)), (fifo,))
    assert code == 2 and "FIFO" in err and ".metadata" in err
    assert no_training == []


def test_fifo_manifest_is_not_a_full_checkpoint(tmp_path, no_training):
    ckpt = _ckpt(tmp_path / "iter_0000010", 10)
    fifo = _fifo(ckpt / MANIFEST_NAME)
    with pytest.raises(ValueError, match="FIFO"):
        _within(HANG, lambda: read_manifest(ckpt), (fifo,))
    code, _, err = _within(HANG, lambda: _evaluate("--load", str(ckpt)), (fifo,))
    assert code == 2 and MANIFEST_NAME in err and "FIFO" in err
    assert no_training == []


@pytest.mark.parametrize("name", [ckpt_common.COMMON_FILE, "metadata.json", "__0_0.distcp"])
def test_fifo_in_place_of_other_checkpoint_files_is_refused(tmp_path, name):
    root = tmp_path / "run"
    _, bad, _ = _window(root)
    fifo = _fifo(bad / name)
    code, rows, _ = _within(HANG, lambda: _list(str(root), "--verify"), (fifo,))
    row = next(r for r in rows if Path(r["path"]).name == bad.name)
    assert code == list_checkpoints.EXIT_PROBLEMS and not row["complete"]
    assert name in row["note"] and "FIFO" in row["note"]
    with pytest.raises(MergeError, match="FIFO"):
        _within(HANG, lambda: inspect_input(bad), (fifo,))


def test_fifo_tracker_file_does_not_hang(tmp_path):
    root = tmp_path / "save"
    _window(root, (10,))
    fifo = _fifo(root / layout.TRACKER_FILE)
    with pytest.raises(ckpt_integrity.IntegrityError, match=f"{layout.TRACKER_FILE}.*FIFO"):
        _within(HANG, lambda: layout.read_tracker(root), (fifo,))


def test_fifo_common_state_is_refused_by_the_reader(tmp_path):
    ckpt = _ckpt(tmp_path / "iter_0000010", 10)
    fifo = _fifo(ckpt / ckpt_common.COMMON_FILE)
    with pytest.raises(ckpt_common.CommonStateError, match="FIFO"):
        _within(HANG, lambda: ckpt_common.read_common_state(ckpt), (fifo,))


# ----------------------------------------------------------------------------- 4/6: symlinks


def _link_out(ckpt: Path, name: str, outside: Path) -> None:
    """Move ``ckpt/name`` outside the checkpoint and leave a symlink to it in its place."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / name
    shutil.move(ckpt / name, target)
    (ckpt / name).symlink_to(target)


@pytest.mark.parametrize("name", ["__0_0.distcp", ckpt_integrity.METADATA_FILE,
                                  ckpt_common.COMMON_FILE, MANIFEST_NAME])
def test_checkpoint_file_symlinked_out_of_the_checkpoint_is_refused(tmp_path, name):
    root = tmp_path / "run"
    inputs = _window(root)
    _link_out(inputs[1], name, tmp_path / "elsewhere")
    code, rows, _ = _list(str(root), "--verify")
    row = next(r for r in rows if Path(r["path"]).name == inputs[1].name)
    assert code == list_checkpoints.EXIT_PROBLEMS and not row["complete"]
    assert "symlink" in row["note"] and name in row["note"]
    with pytest.raises(MergeError, match="symlink"):
        inspect_input(inputs[1])
    code, _, err = _merge("--inputs", *map(str, inputs), "--method", "mean", "--save",
                          str(tmp_path / "m"), "--dry-run")
    assert code == 2 and "symlink" in err


def test_symlinked_window_entry_to_another_run_is_refused(tmp_path):
    """The issue's case: iter_0000020 is a symlink to another run's checkpoint at 150."""
    root = tmp_path / "run"
    _ckpt(root / "iter_0000010", 10)
    _ckpt(root / "iter_0000030", 30)
    other = _ckpt(tmp_path / "other_run" / "iter_0000150", 150)
    (root / "iter_0000020").symlink_to(other)
    with pytest.raises(MergeError, match="iter_0000020.*symlink"):
        select_window(root, window_iters=20)
    code, _, err = _merge("--load-dir", str(root), "--method", "mean", "--save",
                          str(tmp_path / "m"), "--dry-run")
    assert code == 2 and "iter_0000020" in err and "symlink" in err


def test_symlinked_window_entry_is_refused_even_when_it_agrees(tmp_path):
    """Documented choice: entries found by scanning a root are never symlinks (a link can
    pull another run's checkpoint at the same iteration into a window, and retention cannot
    delete it); a path given on the command line may be one."""
    root = tmp_path / "run"
    _ckpt(root / "iter_0000010", 10)
    _ckpt(root / "iter_0000030", 30)
    other = _ckpt(tmp_path / "other_run" / "iter_0000020", 20)
    (root / "iter_0000020").symlink_to(other)
    with pytest.raises(MergeError, match="iter_0000020.*symlink"):
        select_window(root, window_iters=20)
    assert [c.path.name for c in layout.list_window(root)] == ["iter_0000010", "iter_0000030"]
    code, rows, _ = _list(str(root), "--verify")
    row = next(r for r in rows if Path(r["path"]).name == "iter_0000020")
    assert code == list_checkpoints.EXIT_PROBLEMS and not row["complete"]
    assert "symlink" in row["note"]
    assert inspect_input(root / "iter_0000020").iteration == 20  # named explicitly: accepted


# ----------------------------------------------------------------------------- 5: common state


def test_missing_common_state_fails_verify_merge_and_evaluate(tmp_path, no_training):
    root = tmp_path / "run"
    inputs = _window(root)
    (inputs[2] / ckpt_common.COMMON_FILE).unlink()
    code, rows, _ = _list(str(root), "--verify")
    row = next(r for r in rows if Path(r["path"]).name == inputs[2].name)
    assert code == list_checkpoints.EXIT_PROBLEMS and not row["complete"]
    assert "common" in row["note"]
    with pytest.raises(MergeError, match="common state"):
        inspect_input(inputs[2])
    code, _, err = _merge("--inputs", *map(str, inputs), "--method", "mean", "--save",
                          str(tmp_path / "m"))
    assert code == 2 and "common state" in err and not (tmp_path / "m").exists()
    code, _, err = _evaluate("--load", str(inputs[2]))
    assert code == 2 and "common state" in err
    assert no_training == []


def test_unreadable_common_state_fails_verify_merge_and_evaluate(tmp_path, no_training):
    root = tmp_path / "run"
    inputs = _window(root)
    (inputs[0] / ckpt_common.COMMON_FILE).write_bytes(b"not a torch.save file")
    code, rows, _ = _list(str(root), "--verify")
    row = next(r for r in rows if Path(r["path"]).name == inputs[0].name)
    assert code == list_checkpoints.EXIT_PROBLEMS and row["problems"]
    assert any(ckpt_common.COMMON_FILE in p for p in row["problems"])
    with pytest.raises(MergeError, match=ckpt_common.COMMON_FILE):
        inspect_input(inputs[0])  # not only the newest input's common state is read
    code, _, err = _evaluate("--load", str(inputs[0]))
    assert code == 2 and ckpt_common.COMMON_FILE in err
    assert no_training == []


# ----------------------------------------------------------------------------- 6: iterations


def test_name_and_manifest_disagreeing_is_refused(tmp_path, no_training):
    root = tmp_path / "run"
    _ckpt(root / "iter_0000010", 10)
    _ckpt(root / "iter_0000020", 150, manifest_iteration=150)  # a copy of another checkpoint
    _ckpt(root / "iter_0000030", 30)
    with pytest.raises(MergeError, match="iter_0000020.*150"):
        select_window(root, window_iters=20)
    with pytest.raises(MergeError, match="iter_0000020.*150"):
        inspect_input(root / "iter_0000020")
    code, rows, _ = _list(str(root), "--verify")
    row = next(r for r in rows if Path(r["path"]).name == "iter_0000020")
    assert code == list_checkpoints.EXIT_PROBLEMS and not row["complete"]
    assert "150" in row["note"]
    code, _, err = _evaluate("--load", str(root / "iter_0000020"))
    assert code == 2 and "150" in err
    assert no_training == []


def test_manifest_and_common_state_disagreeing_is_refused(tmp_path, no_training):
    root = tmp_path / "run"
    inputs = _window(root)
    bad = _ckpt(tmp_path / "odd" / "iter_0000040", 40, common_iteration=150)
    with pytest.raises(MergeError, match="common state.*150"):
        inspect_input(bad)
    code, _, err = _merge("--inputs", *map(str, inputs[:2]), str(bad), "--method", "mean",
                          "--save", str(tmp_path / "m"), "--dry-run")
    assert code == 2 and "150" in err
    code, rows, _ = _list(str(bad), "--verify")
    assert code == list_checkpoints.EXIT_PROBLEMS and any("150" in p for p in rows[0]["problems"])
    code, _, err = _evaluate("--load", str(bad))
    assert code == 2 and "150" in err
    assert no_training == []


# ----------------------------------------------------------------------------- 7: manifests


@pytest.mark.parametrize(
    "data, problems",
    [
        ([1, 2], ["not a JSON object"]),
        ("iteration", ["not a JSON object"]),
        ({"iteration": "20"}, ["iteration: '20' is not an integer"]),
        ({"iteration": -1}, ["iteration: -1 is negative"]),
        ({"iteration": True}, ["iteration: True is not an integer"]),
        ({"complete": "yes"}, ["complete: 'yes' is not true or false"]),
        ({"kind": "best"}, ["kind: 'best' is not one of"]),
        ({"parallel": [1]}, ["parallel: [1] is not an object"]),
        ({"parallel": {"world_size": "2"}}, ["parallel.world_size: '2' is not an integer"]),
        ({"extra": {"run": []}}, ["extra.run: [] is not an object"]),
        ({"consumed_tokens": 1.5, "learning_rate": "0.1"},
         ["consumed_tokens: 1.5 is not an integer", "learning_rate: '0.1' is not a number"]),
    ],
)
def test_malformed_manifest_names_each_problem(tmp_path, data, problems):
    ckpt = tmp_path / "iter_0000020"
    ckpt.mkdir()
    good = CheckpointManifest(kind="window", iteration=20, complete=True).to_json()
    (ckpt / MANIFEST_NAME).write_text(json.dumps(good | data if isinstance(data, dict) else data))
    with pytest.raises(ValueError) as info:
        read_manifest(ckpt)
    message = str(info.value)
    assert str(ckpt / MANIFEST_NAME) in message
    for problem in problems:
        assert problem in message


def _write_raw_manifest(ckpt: Path, data: Any) -> None:
    (ckpt / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("data", [[1, 2], {"iteration": "20"}])
def test_malformed_manifest_is_refused_by_every_tool(tmp_path, data, no_training):
    root = tmp_path / "run"
    inputs = _window(root)
    raw = data
    if isinstance(data, dict):
        raw = read_manifest(inputs[1]).to_json() | data  # type: ignore[union-attr]
    _write_raw_manifest(inputs[1], raw)
    # The listing goes on past the bad entry, shows it as bad and fails --verify.
    code, rows, _ = _list(str(root), "--verify")
    assert [Path(r["path"]).name for r in rows] == [p.name for p in inputs]
    assert [r["complete"] for r in rows] == [True, False, True]
    assert code == list_checkpoints.EXIT_PROBLEMS and MANIFEST_NAME in rows[1]["note"]
    code, _, _ = _list(str(root))
    assert code == 0  # without --verify a bad entry is shown, not an error
    # The merge refuses it with the message, explicit inputs or window.
    code, _, err = _merge("--inputs", *map(str, inputs), "--method", "mean", "--save",
                          str(tmp_path / "m"), "--dry-run")
    assert code == 2 and MANIFEST_NAME in err and "Traceback" not in err
    with pytest.raises(MergeError, match="unreadable checkpoint.*iter_0000020"):
        select_window(root, window_iters=20)
    # evaluate too, without a traceback.
    code, _, err = _evaluate("--load", str(inputs[1]))
    assert code == 2 and MANIFEST_NAME in err
    assert no_training == []


def test_clean_window_still_passes_every_check(tmp_path, no_training):
    """The control: the same checks accept an intact window (nothing above refuses by
    accident)."""
    root = tmp_path / "run"
    inputs = _window(root)
    code, rows, _ = _list(str(root), "--verify")
    assert code == 0 and [r["verify"] for r in rows] == ["OK"] * 3
    assert [p.name for p in select_window(root, window_iters=20)] == [p.name for p in inputs]
    assert [inspect_input(p).iteration for p in inputs] == [10, 20, 30]
    assert layout.read_tracker(root) is None
    code, _, err = _evaluate("--load", str(inputs[2]))
    assert code == 0, err
    assert len(no_training) == 1


# ----------------------------------------------------------------------------- the trainer's --load


def _trainer_refuses(ckpt: Path, fifos: tuple[Path, ...] = ()) -> str:
    """The message of the trainer's pre-load check (single process: no process group)."""
    from megatron_wsm.checkpoint.manager import CheckpointError, CheckpointManager

    manager = object.__new__(CheckpointManager)  # the check uses no state of the manager
    with pytest.raises(CheckpointError) as info:
        _within(HANG, lambda: manager._verify_before_load(ckpt), fifos)
    return str(info.value)


def test_trainer_load_refuses_before_megatron_core_reads(tmp_path):
    fifo_md = _ckpt(tmp_path / "fifo_md" / "iter_0000010", 10)
    fifo = _fifo(fifo_md / ckpt_integrity.METADATA_FILE)
    assert "FIFO" in _trainer_refuses(fifo_md, (fifo,))
    fifo_json = _ckpt(tmp_path / "fifo_json" / "iter_0000010", 10)
    fifo = _fifo(fifo_json / "metadata.json")  # megatron-core reads it first
    assert "metadata.json" in _trainer_refuses(fifo_json, (fifo,))
    no_common = _ckpt(tmp_path / "no_common" / "iter_0000010", 10)
    (no_common / ckpt_common.COMMON_FILE).unlink()
    assert "no common state" in _trainer_refuses(no_common)
    moved = _ckpt(tmp_path / "moved" / "iter_0000010", 10, common_iteration=150)
    assert "150" in _trainer_refuses(moved)
    linked = _ckpt(tmp_path / "linked" / "iter_0000010", 10)
    _link_out(linked, "__0_0.distcp", tmp_path / "elsewhere")
    assert "symlink" in _trainer_refuses(linked)
    from megatron_wsm.checkpoint.manager import CheckpointManager

    clean = _ckpt(tmp_path / "clean" / "iter_0000010", 10)
    object.__new__(CheckpointManager)._verify_before_load(clean)  # the control: accepted


def test_export_reader_refuses_fifo_metadata_and_shards_linked_out(tmp_path):
    from megatron_wsm.export.mapping import ExportError
    from megatron_wsm.export.reader import CheckpointReader

    fifo_md = _ckpt(tmp_path / "a" / "iter_0000010", 10)
    fifo = _fifo(fifo_md / ckpt_integrity.METADATA_FILE)
    with pytest.raises(ExportError, match="FIFO"):
        _within(HANG, lambda: CheckpointReader(fifo_md), (fifo,))
    linked = _ckpt(tmp_path / "b" / "iter_0000010", 10)
    _link_out(linked, "__0_0.distcp", tmp_path / "elsewhere")
    with pytest.raises(ExportError, match="symlink"):
        CheckpointReader(linked)


def test_legacy_rank_file_symlinked_out_is_refused(tmp_path):
    from megatron_wsm.testing import synthetic as syn

    spec = syn.SyntheticSpec(num_layers=1, hidden=8, ffn=8, num_experts=2, vocab=16)
    ckpt = syn.save_legacy(tmp_path / "iter_0000010", spec, seed=1, iteration=10)
    assert inspect_input(ckpt).format == "torch"  # the control
    _link_out(ckpt / "mp_rank_00", "model_optim_rng.pt", tmp_path / "elsewhere")
    with pytest.raises(MergeError, match="model_optim_rng.pt is a symlink"):
        inspect_input(ckpt)


def test_evaluate_load_dir_checks_every_window_input_before_training(tmp_path, no_training):
    root = tmp_path / "run"
    _ckpt(root / "iter_0000010", 10)
    _ckpt(root / "iter_0000020", 20, common_iteration=150)  # only reading it tells
    _ckpt(root / "iter_0000030", 30)
    code, _, err = _evaluate("--load-dir", str(root), "--method", "mean")
    assert code == 2 and "iter_0000020" in err and "150" in err
    assert no_training == []


def test_reading_a_common_state_leaves_others_safe_globals_registered(tmp_path):
    """torch's own ``safe_globals`` context unregisters its types on exit even when megatron-core
    registered them before (it does at import, Namespace among them): after our reader ran,
    megatron-core's own ``weights_only`` load of a common state holding ``args`` failed with
    "Unsupported global: argparse.Namespace". Our reader leaves the allow-list as it found it."""
    import argparse

    import torch
    import torch.serialization as ts

    from megatron_wsm.checkpoint.common_state import allowed_globals

    path = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(consumed_train_samples=24), "iteration": 3}, path)
    before = list(ts.get_safe_globals())
    ts.add_safe_globals([argparse.Namespace])  # as megatron-core's import does
    try:
        with allowed_globals([argparse.Namespace, torch.Size]):
            assert torch.load(path, weights_only=True)["iteration"] == 3
        assert argparse.Namespace in ts.get_safe_globals()  # still there for megatron-core
        assert torch.Size not in ts.get_safe_globals()  # ours only while we read
        assert torch.load(path, weights_only=True)["args"].consumed_train_samples == 24
    finally:
        ts.clear_safe_globals()
        ts.add_safe_globals(before)
    with allowed_globals([argparse.Namespace]):
        pass
    assert argparse.Namespace not in ts.get_safe_globals() or argparse.Namespace in before
