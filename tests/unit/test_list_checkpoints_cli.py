"""``tools/list_checkpoints.py`` on real torch_dist directories: what it finds (one checkpoint, a
root, a run directory with ``wsm_window``), what it refuses (missing or empty paths), and the
integrity marks (a truncated shard without ``--verify``, a flipped byte with ``--verify``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint import integrity as ci
from megatron_wsm.checkpoint.manifest import CheckpointManifest, write_manifest
from megatron_wsm.cli.list_checkpoints import EXIT_NOT_FOUND, EXIT_PROBLEMS, main


def _checkpoint(path: Path, iteration: int, kind: str) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(2048, dtype=torch.float32) * iteration, "b": torch.ones(3, 5)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    torch.save({"iteration": iteration}, path / "common.pt")  # megatron-core's common state
    write_manifest(path, CheckpointManifest(kind=kind, iteration=iteration, complete=True))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --save root: one full checkpoint and a window of two under wsm_window."""
    root = tmp_path_factory.mktemp("run")
    _checkpoint(root / "iter_0000008", 8, "full")
    _checkpoint(root / "wsm_window" / "iter_0000004", 4, "window")
    _checkpoint(root / "wsm_window" / "iter_0000008", 8, "window")
    (root / "tb").mkdir()  # a subdirectory without checkpoints is not an error
    return root


def _rows(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip() else [], err


def test_run_dir_lists_root_and_window(run_dir: Path, capsys) -> None:
    rc, rows, _ = _rows(capsys, str(run_dir))
    assert rc == 0
    got = [(Path(r["path"]).relative_to(run_dir).as_posix(), r["kind"], r["complete"])
           for r in rows]
    assert got == [
        ("iter_0000008", "full", True),
        ("wsm_window/iter_0000004", "window", True),
        ("wsm_window/iter_0000008", "window", True),
    ]


def test_single_checkpoint_dir(run_dir: Path, capsys) -> None:
    rc, rows, _ = _rows(capsys, str(run_dir / "wsm_window" / "iter_0000004"))
    assert rc == 0
    assert [(r["iteration"], r["kind"], r["complete"]) for r in rows] == [(4, "window", True)]
    main([str(run_dir / "wsm_window" / "iter_0000004")])  # the table prints it too
    assert "iter_0000004" in capsys.readouterr().out


def test_missing_and_empty_paths_fail(run_dir: Path, tmp_path: Path, capsys) -> None:
    rc, rows, err = _rows(capsys, str(tmp_path / "nope"))
    assert rc == EXIT_NOT_FOUND and rows == [] and "no such file" in err
    rc, rows, err = _rows(capsys, str(run_dir / "tb"))
    assert rc == EXIT_NOT_FOUND and "no checkpoint found" in err
    # One bad path among good ones: the good ones are still listed, the exit status says it.
    rc, rows, err = _rows(capsys, str(run_dir / "wsm_window"), str(tmp_path / "nope"))
    assert rc == EXIT_NOT_FOUND and len(rows) == 2 and "nope" in err


def test_truncated_shard_is_not_complete_without_verify(run_dir: Path, tmp_path: Path,
                                                          capsys) -> None:
    ckpt = shutil.copytree(run_dir / "wsm_window" / "iter_0000004", tmp_path / "iter_0000004")
    shard = next(ckpt.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size - 100)
    rc, rows, _ = _rows(capsys, str(tmp_path))
    assert rc == 0  # listing only: the checkpoint is shown, marked
    assert rows[0]["complete"] is False
    assert "refused" in rows[0]["note"] and "past the end" in rows[0]["note"]
    rc, rows, _ = _rows(capsys, str(tmp_path), "--complete-only")
    assert rows == []
    rc, rows, _ = _rows(capsys, str(tmp_path), "--verify")
    assert rc == EXIT_PROBLEMS and rows[0]["problems"]


def test_verify_finds_a_flipped_byte(run_dir: Path, tmp_path: Path, capsys) -> None:
    ckpt = shutil.copytree(run_dir / "wsm_window" / "iter_0000008", tmp_path / "iter_0000008")
    rc, rows, _ = _rows(capsys, str(ckpt), "--verify")
    assert rc == 0 and rows[0]["verify"] == "OK" and rows[0]["problems"] == []
    md = ci.load_metadata(ckpt)
    info = next(s for i, s in md.storage_data.items() if i.fqn == "w")
    path = ckpt / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    rc, rows, _ = _rows(capsys, str(ckpt))
    assert rc == 0 and rows[0]["complete"] is True  # sizes match: only the CRC sees it
    rc, rows, _ = _rows(capsys, str(ckpt), "--verify")
    assert rc == EXIT_PROBLEMS
    assert len(rows[0]["problems"]) == 1 and "CRC-32 mismatch" in rows[0]["problems"][0]
    assert main([str(ckpt), "--verify"]) == EXIT_PROBLEMS
    out = capsys.readouterr().out
    assert "verify: 1 problem(s)" in out and "CRC-32 mismatch" in out


def test_verify_says_when_not_torch_dist(tmp_path: Path, capsys) -> None:
    legacy = tmp_path / "iter_0000002"
    (legacy / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": {}}, legacy / "mp_rank_00" / "model_optim_rng.pt")
    manifest = CheckpointManifest(kind="full", iteration=2, complete=True,
                                  checkpoint_format="torch")
    write_manifest(legacy, manifest)
    rc, rows, _ = _rows(capsys, str(legacy), "--verify")
    assert rc == 0 and rows[0]["complete"] is True
    assert rows[0]["verify"].startswith("not torch_dist")
    # A manifest that promises torch_dist shards without .metadata is a problem, not a skip.
    write_manifest(legacy, CheckpointManifest(kind="full", iteration=2, complete=True))
    rc, rows, _ = _rows(capsys, str(legacy), "--verify")
    assert rc == EXIT_PROBLEMS and "missing .metadata" in rows[0]["problems"][0]
    assert rows[0]["complete"] is False
