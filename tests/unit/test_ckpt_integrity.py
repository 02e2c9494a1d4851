"""Hostile inputs for the torch_dist integrity checks: crafted pickles, ``../`` shard names,
truncated files, flipped bits."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint import integrity as ci


def _save(path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3, 5)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path


def _rewrite_metadata(path: Path, edit) -> None:
    md = ci.load_metadata(path)
    edit(md)
    with open(path / ci.METADATA_FILE, "wb") as f:
        pickle.dump(md, f)


def test_clean_checkpoint_verifies(tmp_path):
    ckpt = _save(tmp_path / "c")
    assert ci.verify(ckpt, crc=True) == []
    md = ci.load_metadata(ckpt)
    assert {i.fqn for i in md.storage_data} == {"a", "b"}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_metadata_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    ckpt = _save(tmp_path / "c")
    with open(ckpt / ci.METADATA_FILE, "wb") as f:
        pickle.dump(_RunsCode(), f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ci.IntegrityError, match="refusing to load"):
        ci.load_metadata(ckpt)
    assert not (tmp_path / "PWNED").exists()
    assert "unsafe" in ci.verify(ckpt)[0]


def test_metadata_of_another_type_is_refused(tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    with open(ckpt / ci.METADATA_FILE, "wb") as f:
        pickle.dump({"storage_data": {}}, f)
    with pytest.raises(ci.IntegrityError, match="not DCP Metadata"):
        ci.load_metadata(ckpt)


def test_missing_metadata(tmp_path):
    with pytest.raises(ci.IntegrityError, match="missing"):
        ci.load_metadata(tmp_path)


@pytest.mark.parametrize(
    "name",
    ["../x__0_0.distcp", "../../x__0_0.distcp", "/etc/passwd", "sub/__0_0.distcp",
     ".hidden.distcp", "__0_0.pt", "", "..\\x.distcp"],
)
def test_shard_names_outside_the_checkpoint_are_refused(tmp_path, name):
    with pytest.raises(ci.IntegrityError):
        ci.check_relative_path(name)
    ckpt = _save(tmp_path / "c")

    def escape(md):
        index = next(iter(md.storage_data))
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], relative_path=name)

    _rewrite_metadata(ckpt, escape)
    problems = ci.storage_problems(ckpt)
    assert problems and "plain" in problems[0]


def test_plain_names_accepted():
    assert ci.check_relative_path("__0_0.distcp") == "__0_0.distcp"


def test_ranges_past_the_end_and_missing_files(tmp_path):
    ckpt = _save(tmp_path / "c")
    shard = next(ckpt.glob("*.distcp"))
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    problems = ci.storage_problems(ckpt)
    assert problems and "past the end" in problems[0]
    shard.unlink()
    assert any("missing" in p for p in ci.storage_problems(ckpt))


def test_flipped_bit_in_tensor_data_is_found(tmp_path):
    ckpt = _save(tmp_path / "c")
    md = ci.load_metadata(ckpt)
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn == "a")
    path = ckpt / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert ci.storage_problems(ckpt) == []  # sizes are fine: only the CRC sees it
    problems = ci.verify(ckpt, crc=True)
    assert len(problems) == 1 and "CRC-32 mismatch" in problems[0] and "item a" in problems[0]
    assert ci.crc_problems(ckpt, fqns=["b"]) == []


def test_storage_index_of_another_save_is_found(tmp_path):
    """Two saves' write results crossed: each ``.metadata`` holds the other's storage index."""
    small = tmp_path / "small"
    import torch.distributed.checkpoint as dcp

    dcp.save({"a": torch.zeros(8)}, storage_writer=dcp.FileSystemWriter(str(small)), no_dist=True)
    big = _save(tmp_path / "big")
    small_md, big_md = ci.load_metadata(small), ci.load_metadata(big)
    # The big save's metadata with the small save's records: every listed range fits, yet "b"
    # and most of "a" are gone — only the coverage check can tell.
    _rewrite_metadata(big, lambda md: setattr(md, "storage_data", small_md.storage_data))
    problems = ci.storage_problems(big)
    assert any("b (chunk at (0, 0)): described but has no storage record" in p for p in problems)
    _rewrite_metadata(small, lambda md: setattr(md, "storage_data", big_md.storage_data))
    assert any("does not describe" in p for p in ci.storage_problems(small))
    assert ci.verify(_save(tmp_path / "clean")) == []


# ----------------------------------------------------------------------------- regular files


def test_only_regular_files_are_opened_and_reads_are_bounded(tmp_path):
    plain = tmp_path / "common.pt"
    plain.write_bytes(b"0123456789")
    assert ci.read_regular(plain, 10) == b"0123456789"
    assert ci.regular_size(plain) == 10
    with pytest.raises(ci.IntegrityError, match="10 bytes, more than the 5"):
        ci.read_regular(plain, 5)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(plain)  # even one pointing inside the checkpoint
    (tmp_path / "dir").mkdir()
    cases = {"fifo": "FIFO", "link": "symlink to", "dir": "directory"}
    for name, kind in cases.items():
        for call in (ci.regular_size, ci.open_regular, lambda p: ci.read_regular(p, 100)):
            with pytest.raises(ci.IntegrityError, match=f"{name} is a {kind}"):
                call(tmp_path / name)
    with pytest.raises(ci.IntegrityError, match="character device"):
        ci.open_regular("/dev/zero")  # never read: it would never end
    with pytest.raises(FileNotFoundError):
        ci.open_regular(tmp_path / "missing")
