"""What the export and the merge may delete or replace: one rule (megatron_wsm.checkpoint.publish).

Hostile cases of issue 24, item 1 (``export_hf.py --overwrite`` deleted whatever ``--save``
named): each builds the victim, runs the tool as a user would, and checks that the victim is
byte-for-byte untouched. Also: published outputs follow the umask (issue 25, item 4), and a
concurrent tool's temporary directory is never taken for a stale one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_wsm.checkpoint import publish
from megatron_wsm.checkpoint.manifest import write_manifest
from megatron_wsm.cli import export_hf
from megatron_wsm.export import writer
from megatron_wsm.export.mapping import ExportError
from megatron_wsm.merge import MERGED_OUTPUT, MergeError, check_output_location
from megatron_wsm.testing import synthetic as syn


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def _checkpoint(path: Path, iteration: int = 20, kind: str = "full") -> Path:
    """A directory that is a checkpoint as far as the location rules go."""
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"not read by these tests")
    (path / "__0_0.distcp").write_bytes(os.urandom(64))
    (path / "common.pt").write_bytes(b"x")
    write_manifest(path, syn.synthetic_manifest(syn.SyntheticSpec(), iteration, 1, kind=kind))
    return path


@pytest.fixture()
def run_root(tmp_path: Path) -> Path:
    """A run: ``ckpt/`` with two full checkpoints, the tracker file and a window."""
    root = tmp_path / "run"
    ckpt = root / "ckpt"
    _checkpoint(ckpt / "iter_0000010", 10)
    _checkpoint(ckpt / "iter_0000020", 20)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("20")
    _checkpoint(ckpt / "wsm_window" / "iter_0000018", 18, kind="window")
    (root / "tb").mkdir()
    (root / "tb" / "events.out").write_bytes(b"tb")
    return root


def _export(load: Path, save: Path, *extra: str, capsys) -> tuple[int, str]:
    code = export_hf.main(["--load", str(load), "--save", str(save), *extra])
    return code, capsys.readouterr().err


def test_export_overwrite_refuses_the_checkpoint_it_exports(run_root, capsys):
    ck = run_root / "ckpt" / "iter_0000020"
    before = _snapshot(run_root)
    code, err = _export(ck, ck, "--overwrite", capsys=capsys)
    assert code == 2 and "is or lies inside" in err
    assert _snapshot(run_root) == before


def test_export_overwrite_refuses_a_run_root(run_root, tmp_path, capsys):
    ck = run_root / "ckpt" / "iter_0000020"
    copy = tmp_path / "copy_of_run"
    shutil.copytree(run_root, copy)
    before = _snapshot(copy)
    code, err = _export(ck, copy, "--overwrite", capsys=capsys)
    assert code == 2 and "has no wsm_export.json" in err and "refusing to delete" in err
    assert _snapshot(copy) == before
    # The save directory itself (tracker, checkpoints) is refused the same way.
    code, err = _export(ck, run_root / "ckpt", "--overwrite", capsys=capsys)
    assert code == 2 and "contains the input" in err
    assert _snapshot(copy) == before


def test_export_overwrite_refuses_unrelated_files(run_root, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("precious")
    code, err = _export(run_root / "ckpt" / "iter_0000020", thesis, "--overwrite",
                        capsys=capsys)
    assert code == 2 and "has no wsm_export.json" in err
    assert (thesis / "chapter1.tex").read_text() == "precious"


def test_export_refuses_save_inside_the_checkpoint(run_root, capsys):
    ck = run_root / "ckpt" / "iter_0000020"
    before = _snapshot(run_root)
    code, err = _export(ck, ck / "hf", capsys=capsys)
    assert code == 2 and "lies inside" in err
    assert _snapshot(run_root) == before
    # Inside another checkpoint of the run (not the one exported) too.
    code, err = _export(ck, run_root / "ckpt" / "iter_0000010" / "hf", capsys=capsys)
    assert code == 2 and "lies inside the checkpoint" in err
    assert _snapshot(run_root) == before


def test_export_overwrite_refuses_an_export_holding_other_files(tmp_path):
    hf = tmp_path / "hf"
    writer.publish_export(hf, False, _fake_export)
    (hf / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds notes.txt, which the export does not write"):
        writer.publish_export(hf, True, _fake_export)
    assert (hf / "notes.txt").read_text() == "mine"
    # A marker that is not an export's, or a symlink in place of a shard, is refused too.
    (hf / "notes.txt").unlink()
    (hf / writer.MARKER_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportError, match="not an export's"):
        writer.publish_export(hf, True, _fake_export)


def _fake_export(tmp: Path) -> None:
    writer.write_json(tmp / writer.MARKER_NAME, {"format": writer.EXPORT_FORMAT})
    writer.write_json(tmp / "config.json", {})
    (tmp / writer.SINGLE_NAME).write_bytes(b"weights")


def test_export_replaces_its_own_output_only(tmp_path):
    hf = tmp_path / "hf"
    writer.publish_export(hf, False, _fake_export)
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        writer.publish_export(hf, False, _fake_export)
    writer.publish_export(hf, True, lambda t: (_fake_export(t), (t / "README.md").write_text("2")))
    assert (hf / "README.md").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_merge_and_export_share_the_rule(run_root, tmp_path):
    """The merge refuses what the export refuses (same module), with its own error type."""
    ck = run_root / "ckpt" / "iter_0000020"
    for target, overwrite, why in [
        (run_root / "ckpt" / "iter_0000010" / "merged", False, "lies inside the checkpoint"),
        (run_root / "tb", True, "has no wsm_manifest.json"),
        (run_root / "ckpt" / "iter_0000010", True, "is a 'full' checkpoint"),
    ]:
        with pytest.raises(MergeError, match=why):
            check_output_location(target, [ck], [], overwrite)
    # A merged checkpoint of ours inside a run's save directory: created there, never replaced.
    merged = run_root / "ckpt" / "merged"
    merged.mkdir()
    write_manifest(merged, syn.synthetic_manifest(syn.SyntheticSpec(), 20, 1, kind="merged"))
    assert publish.replace_refusal(merged, MERGED_OUTPUT) is None
    with pytest.raises(MergeError, match="save directory .* of a run"):
        check_output_location(merged, [ck], [], True)
    check_output_location(tmp_path / "elsewhere", [ck], [], False)  # a new directory is fine


def test_symlink_output_is_never_replaced(tmp_path):
    real = tmp_path / "real"
    writer.publish_export(real, False, _fake_export)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ExportError, match="is or lies inside|symbolic link"):
        writer.publish_export(link, True, _fake_export)
    assert (real / writer.MARKER_NAME).is_file() and link.is_symlink()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_published_modes_follow_the_umask(tmp_path, umask):
    def private_fill(tmp: Path) -> None:
        _fake_export(tmp)
        os.chmod(tmp / writer.SINGLE_NAME, 0o600)  # as the safetensors writer leaves it

    old = os.umask(umask)
    try:
        writer.publish_export(tmp_path / "hf", False, private_fill)
    finally:
        os.umask(old)
    hf = tmp_path / "hf"
    assert stat.S_IMODE(hf.stat().st_mode) == 0o777 & ~umask
    for f in hf.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_a_live_exports_temporary_directory_is_not_stale(tmp_path):
    save = tmp_path / "hf"
    host_tmp = publish.temp_name(save, writer.TMP_TAG)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        base = host_tmp.rsplit("-", 1)[0]
        (tmp_path / f"{base}-{live.pid}").mkdir()
        (tmp_path / f"{base}-{int(dead.stdout)}").mkdir()
        (tmp_path / f".hf.{writer.TMP_TAG}-otherhost-{int(dead.stdout)}").mkdir()
        writer.publish_export(save, False, _fake_export)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert f"{base}-{live.pid}" in left  # a concurrent export's: kept
        assert f"{base}-{int(dead.stdout)}" not in left  # a killed one's on this host: removed
        assert f".hf.{writer.TMP_TAG}-otherhost-{int(dead.stdout)}" in left  # unknown: kept
    finally:
        live.kill()
        live.wait()
