"""Hostile and corrupt inputs of the WSM merge: each test builds the attack or the damage and
checks the merge refuses it before anything is published (issues 12 and 18).

Inputs are the synthetic torch_dist checkpoints shared with tests/unit/test_merge.py.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import dcp_format as fmt
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.manifest import read_manifest, write_manifest
from megatron_wsm.cli import merge_wsm
from megatron_wsm.merge import MergeError, merge_checkpoints, select_window, torch_dist
from megatron_wsm.merge.torch_dist import ACTION_AVERAGE, ACTION_DROP, classify, is_dropped
from megatron_wsm.testing import synthetic as syn

WINDOW = syn.TEST_WINDOW
COEFS = [0.2, 0.3, 0.5]


@pytest.fixture(scope="module")
def window(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = syn.build_test_checkpoints(tmp_path_factory.getbasetemp())
    return [root / name for name in WINDOW]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _nothing_published(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.merging-*")), "temporary directory left"


def _item(ckpt: Path, fqn: str) -> tuple[Path, int, fmt.TensorBlob]:
    """(shard file, item offset, parsed blob) of the first storage item of ``fqn``."""
    md = ckpt_integrity.load_metadata(ckpt)
    index, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == fqn)
    path = ckpt / info.relative_path
    with open(path, "rb") as f:
        blob = fmt.describe_tensor_blob(fmt.BlobReader(
            lambda o, n: os.pread(f.fileno(), n, info.offset + o), info.length
        ))
    return path, info.offset, blob


def _flip_bit(ckpt: Path, fqn: str, where: float = 0.5) -> Path:
    """Flip the lowest bit of one byte of an item's storage (the value stays finite)."""
    path, offset, blob = _item(ckpt, fqn)
    pos = offset + blob.data_offset + int(blob.data_size * where) // 2 * 2
    with open(path, "r+b") as f:
        byte = os.pread(f.fileno(), 1, pos)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 1]), pos)
    return path


# ----------------------------------------------------------------------------- --overwrite


def _foreign_dir(tmp_path: Path) -> Path:
    d = tmp_path / "thesis"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "thesis.tex").write_text("years of work")
    return d


def _plain_file(tmp_path: Path) -> Path:
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    return f


def _window_ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "iter_0000040"
    d.mkdir()
    write_manifest(d, syn.synthetic_manifest(syn.SyntheticSpec(), 40, 1, kind="window"))
    return d


@pytest.mark.parametrize(
    "make, why",
    [(_foreign_dir, "has no wsm_manifest.json"), (_plain_file, "is not a directory"),
     (_window_ckpt, "is a 'window' checkpoint")],
)
def test_overwrite_refuses_what_a_merge_did_not_write(window, tmp_path, make, why):
    target = make(tmp_path)
    before = sorted(str(p) for p in target.rglob("*")) if target.is_dir() else target.read_text()
    for dry_run in (True, False):
        with pytest.raises(MergeError, match=f"--overwrite replaces only a merged.*{why}"):
            merge_checkpoints(window, COEFS, target, overwrite=True, dry_run=dry_run)
    after = sorted(str(p) for p in target.rglob("*")) if target.is_dir() else target.read_text()
    assert before == after
    assert not list(tmp_path.glob(f".{target.name}.merging-*"))


def test_overwrite_refuses_a_merged_checkpoint_holding_other_files(window, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoints(window, COEFS, out)
    (out / "my_eval_results.json").write_text("{}")
    with pytest.raises(MergeError, match="holds my_eval_results.json"):
        merge_checkpoints(window, COEFS, out, overwrite=True)
    assert (out / "my_eval_results.json").exists()


# ----------------------------------------------------------------------------- .metadata


def _rewrite_metadata(ckpt: Path, edit) -> None:
    md = ckpt_integrity.load_metadata(ckpt)
    edit(md)
    fmt.write_metadata(str(ckpt / ".metadata"), md)


@pytest.mark.parametrize("which", [0, 2])  # an older input, and the newest (output names)
def test_shard_path_outside_the_checkpoint_is_refused(window, tmp_path, which):
    inputs = [_copy(w, tmp_path / "in" / w.name) for w in window]
    victim = inputs[which]
    # The attack: point an item at "../../x__0_0.distcp" holding the real bytes.
    escaped = tmp_path / "x__0_0.distcp"

    def edit(md):
        for index, info in md.storage_data.items():
            if index.fqn == "output_layer.weight":
                shutil.copyfile(victim / info.relative_path, escaped)
                md.storage_data[index] = fmt.make_storage_info(
                    "../../x__0_0.distcp", info.offset, info.length)

    _rewrite_metadata(victim, edit)
    out = tmp_path / "out" / "merged"
    for dry_run in (True, False):
        with pytest.raises(MergeError, match=r"'\.\./\.\./x__0_0\.distcp' is not a plain"):
            merge_checkpoints(inputs, COEFS, out, dry_run=dry_run)
    _nothing_published(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "x__0_0.distcp"]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_crafted_metadata_pickle_runs_no_code_even_in_dry_run(window, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    bad = _copy(window[1], tmp_path / "w20")
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(MergeError, match="refusing to load posix.system"):
        merge_checkpoints([window[0], bad, window[2]], COEFS, None, dry_run=True)
    assert not marker.exists()


def test_common_pt_needing_unsafe_pickles_is_refused_not_copied(window, tmp_path):
    import datetime

    newest = _copy(window[2], tmp_path / "w30")
    torch.save({"iteration": 30, "when": datetime.datetime(2024, 1, 1)}, newest / "common.pt")
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="common.pt: not loadable by the restricted"):
        merge_checkpoints([*window[:2], newest], COEFS, out, dry_run=True)
    with pytest.raises(MergeError, match="refusing an unverified pickle"):
        merge_checkpoints([*window[:2], newest], COEFS, out)
    _nothing_published(out)


def _embedded_pair(tmp_path: Path) -> list[Path]:
    """Copies of the two synthetic checkpoints laid out as megatron-core >= 0.19 saves them."""
    root = syn.build_test_checkpoints(tmp_path.parent)
    return [_copy(root / name, tmp_path / name) for name in ("embedded_a", "embedded_b")]


def _common_state_record(ckpt: Path) -> tuple[Any, Any, Any]:
    md = ckpt_integrity.load_metadata(ckpt)
    index, info = next(
        (i, v) for i, v in md.storage_data.items() if i.fqn == "common_state/shard_0_1"
    )
    return md, index, info


def test_embedded_common_state_needing_unsafe_pickles_runs_no_code(tmp_path, monkeypatch):
    """megatron-core >= 0.19 keeps the common state inside a shard file: a crafted one (here a
    pickle that would run a command, appended and pointed at by .metadata) is refused before
    anything is written, and the input ordering does not execute it either."""
    import io

    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    older, newest = _embedded_pair(tmp_path)
    md, index, info = _common_state_record(newest)
    crafted = io.BytesIO()
    torch.save([{"iteration": 30, "hook": _Exploit()}], crafted)
    shard = newest / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(crafted.getvalue())
    length = len(crafted.getvalue())
    md.storage_data[index] = fmt.make_storage_info(info.relative_path, offset, length)
    fmt.write_metadata(str(newest / ".metadata"), md)
    out = tmp_path / "merged"
    for dry_run in (True, False):
        with pytest.raises(MergeError, match="common_state.*not loadable by the restricted"):
            merge_checkpoints([older, newest], [0.5, 0.5], out, dry_run=dry_run,
                              allow_no_manifest=True)
    _nothing_published(out)
    assert not marker.exists()


def test_embedded_common_state_past_the_end_is_refused_without_reading(tmp_path):
    """A crafted storage record claiming a huge common state: refused from the file size, so
    nothing of that length is allocated or read."""
    older, newest = _embedded_pair(tmp_path)
    md, index, info = _common_state_record(newest)
    md.storage_data[index] = fmt.make_storage_info(info.relative_path, info.offset, 1 << 40)
    fmt.write_metadata(str(newest / ".metadata"), md)
    out = tmp_path / "merged"
    # Refused by the input's range check (before its common state is read), or by the reader.
    with pytest.raises(MergeError, match="common_state.*past the end"):
        merge_checkpoints([older, newest], [0.5, 0.5], out, dry_run=True, allow_no_manifest=True)
    _nothing_published(out)
    with pytest.raises(ckpt_common.CommonStateError, match="past the end of the file"):
        ckpt_common.read_common_state(newest)


def test_bit_rot_in_the_embedded_common_state_is_refused(tmp_path):
    older, newest = _embedded_pair(tmp_path)
    _, _, info = _common_state_record(newest)
    with open(newest / info.relative_path, "r+b") as f:
        blob = fmt.BlobReader(lambda o, n: os.pread(f.fileno(), n, info.offset + o), info.length)
        pickled = next(r for r in fmt.parse_zip(blob) if r.name.endswith("data.pkl"))
        pos = info.offset + pickled.data_offset + pickled.size // 2  # inside the pickled state
        byte = os.pread(f.fileno(), 1, pos)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 1]), pos)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="common_state.*CRC-32 mismatch"):
        merge_checkpoints([older, newest], [0.5, 0.5], out, allow_no_manifest=True)
    _nothing_published(out)


# ----------------------------------------------------------------------------- CRC-32


@pytest.mark.parametrize("chunk_mb", [64, 0.005])  # whole items, and items split in pieces
def test_bit_rot_in_an_averaged_item_is_refused(window, tmp_path, chunk_mb):
    bad = _copy(window[1], tmp_path / "w20")
    shard = _flip_bit(bad, "output_layer.weight", where=0.9)
    out = tmp_path / "merged"
    with pytest.raises(MergeError) as err:
        merge_checkpoints([window[0], bad, window[2]], COEFS, out, chunk_mb=chunk_mb)
    message = str(err.value)
    assert "CRC-32 mismatch" in message and str(bad) in message
    assert shard.name in message and "output_layer.weight" in message
    _nothing_published(out)


def test_bit_rot_in_a_copied_item_is_refused_before_writing(window, tmp_path):
    newest = _copy(window[2], tmp_path / "w30")
    _flip_bit(newest, "decoder.layers.mlp.router.token_counts")
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"w30: .*item decoder.layers.mlp.router.token_counts.*"
                                         r"CRC-32 mismatch"):
        merge_checkpoints([*window[:2], newest], COEFS, out, dry_run=True)


def test_zero_coefficient_input_is_not_crc_checked_and_said_so(window, tmp_path):
    bad = _copy(window[0], tmp_path / "w10")
    _flip_bit(bad, "output_layer.weight")
    report = merge_checkpoints([bad, *window[1:]], [0.0, 0.5, 0.5], tmp_path / "merged")
    assert any("nor checked for NaN/Inf or CRC-32" in n for n in report.notes)


def test_crc_check_can_be_turned_off_for_the_benchmark(window, tmp_path):
    bad = _copy(window[1], tmp_path / "w20")
    _flip_bit(bad, "output_layer.weight")
    report = merge_checkpoints([window[0], bad, window[2]], COEFS, tmp_path / "m",
                               verify_crc=False)
    assert any("NOT checked" in n for n in report.notes)


# ----------------------------------------------------------------------------- --save placement


def test_save_inside_containing_or_aliasing_an_input_is_refused(window, tmp_path):
    inputs = [_copy(w, tmp_path / "ckpts" / w.name) for w in window]
    link = tmp_path / "link"
    link.symlink_to(inputs[0])
    cases = [
        (inputs[0] / "merged", "lies inside"),
        (link / "merged", "lies inside"),  # the same place through a symlink
        (tmp_path / "ckpts", "contains the input"),
    ]
    for out, message in cases:
        with pytest.raises(MergeError, match=message):
            merge_checkpoints(inputs, COEFS, out, dry_run=True)
    assert not (inputs[0] / "merged").exists()


def test_save_inside_the_load_dir_is_refused(window, tmp_path):
    with pytest.raises(MergeError, match="lies inside"):
        merge_checkpoints(window, COEFS, window[0].parent / "sub" / "merged", dry_run=True,
                          protected=[window[0].parent])


def test_dry_run_checks_that_save_can_be_created(window, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MergeError, match="is not a directory"):
        merge_checkpoints(window, COEFS, blocker / "merged", dry_run=True)
    ok = merge_checkpoints(window, COEFS, tmp_path / "new" / "deeper" / "merged", dry_run=True)
    assert ok.dry_run and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- --load-dir


def _manifest_only(root: Path, name: str, iteration: int, kind: str = "window") -> Path:
    manifest = syn.synthetic_manifest(syn.SyntheticSpec(), iteration, 1, kind=kind)
    (root / name).mkdir(parents=True)
    write_manifest(root / name, manifest)
    return root / name


def test_corrupt_manifest_inside_the_window_is_an_error(tmp_path):
    for it in (100, 200, 300, 400):
        _manifest_only(tmp_path, f"iter_{it:07d}", it)
    (tmp_path / "iter_0000200" / "wsm_manifest.json").write_text("{not json")
    for selection in ({"window_iters": 300}, {"count": 3}):  # both span iteration 200
        with pytest.raises(MergeError, match="unreadable checkpoint.*iter_0000200"):
            select_window(tmp_path, **selection)
    # Outside the selected window it does not matter.
    assert [p.name for p in select_window(tmp_path, window_iters=100)] == [
        "iter_0000300", "iter_0000400"]


def test_missing_shard_inside_the_window_is_an_error(window, tmp_path):
    root = tmp_path / "root"
    for w in window:
        _copy(w, root / w.name)
    next((root / "w20").glob("*.distcp")).unlink()
    with pytest.raises(MergeError, match=r"unreadable checkpoint.*w20 \(shard file .* missing"):
        select_window(root, count=3)


def test_count_below_two_is_refused(window, tmp_path, capsys):
    for count in ("0", "-1", "1"):
        rc = merge_wsm.main(["--load-dir", str(window[0].parent), "--count", count, "--dry-run"])
        assert rc == 2 and f"--count {count}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the CLI


def test_negative_weights_in_plain_form(window, capsys):
    from megatron_wsm.coefficients import validate_coefficients

    args = ["--inputs", *map(str, window), "--weights", "-0.5,0.7,0.8", "--dry-run"]
    assert merge_wsm.main(args) == 2
    err = capsys.readouterr().err
    # The library's message names the flag and the keyword; the CLI prints it unchanged.
    with pytest.raises(ValueError) as library:
        validate_coefficients([-0.5, 0.7, 0.8])
    assert err == f"merge_wsm: error: {library.value}\n"
    assert "--allow-negative" in err and "allow_negative=True in Python" in err
    assert not hasattr(merge_wsm, "_flag_names")
    assert merge_wsm.main([*args, "--allow-negative", "--no-progress-bar"]) == 0
    assert "-0.500000" in capsys.readouterr().out
    assert merge_wsm.join_negative_lists(["--decay", "-.1,2", "--save", "-x"]) == [
        "--decay=-.1,2", "--save", "-x"]


# ----------------------------------------------------------------------------- I/O failures


def test_input_removed_during_the_merge_is_reported_as_such(window, tmp_path, monkeypatch):
    inputs = [_copy(w, tmp_path / w.name) for w in window]
    real = torch_dist.build_plan

    def plan_then_prune(*args, **kwargs):
        plan = real(*args, **kwargs)
        shutil.rmtree(inputs[1])  # the trainer's retention prunes it now
        return plan

    monkeypatch.setattr(torch_dist, "build_plan", plan_then_prune)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"w20: disappeared during the merge"):
        merge_checkpoints(inputs, COEFS, out)
    _nothing_published(out)


def test_no_space_left_names_the_output(window, tmp_path, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)  # os.pwrite, as the streamer calls it
    out = tmp_path / "merged"
    with pytest.raises(MergeError) as e:
        merge_checkpoints(window, COEFS, out)
    # The --save path the user gave first; the hidden temporary file only as detail.
    message = str(e.value)
    assert message.startswith(f"writing --save {out} failed: No space left on device (at ")
    assert ".merged.merging-" in message and message.endswith(".distcp)")
    _nothing_published(out)


def test_failed_manifest_write_names_the_output(window, tmp_path, monkeypatch, capsys):
    from megatron_wsm.merge import output as merge_output

    def full(path, _manifest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "wsm_manifest.json"))

    monkeypatch.setattr(merge_output, "write_manifest", full)
    out = tmp_path / "merged"
    args = ["--inputs", *map(str, window), "--method", "mean", "--save", str(out)]
    assert merge_wsm.main([*args, "--no-progress-bar"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"merge_wsm: error: writing --save {out} failed: No space left")
    assert "wsm_manifest.json)" in err
    _nothing_published(out)


# ----------------------------------------------------------------------------- what is dropped


@pytest.mark.parametrize(
    "key",
    [
        "optimizer.state.exp_avg.decoder.layers.mlp.router.weight",
        "optimizer.state.fp32_param.output_layer.weight",
        "chained_0.optimizer.state.exp_avg.embedding.word_embeddings.weight",
        "chained_1.optimizer.state.exp_avg_sq.decoder.layers.mlp.experts.experts.linear_fc1.weight",
        "optimizer.distributed.dp_group_idx_0.param_state",
        "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32)"
        ".bucket_idx_0.exp_avg",
        "chained_12.optimizer.distributed.dp_group_idx_1.exp_avg_sq",
        "rng_state",
        "rng_state/shard_0_2",
    ],
)
def test_optimizer_and_rng_keys_are_dropped_whatever_their_scheme(key):
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    fp32 = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([4]),
        [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))],
    )
    assert is_dropped(key) and classify(key, fp32) == ACTION_DROP


@pytest.mark.parametrize(
    "key", ["output_layer.weight", "decoder.layers.mlp.router.expert_bias",
            "my_optimizer.weight", "chained_x.optimizer.w", "rng_statistics.weight"],
)
def test_model_keys_are_not_dropped(key):
    assert not is_dropped(key)


def test_report_counts_what_was_dropped(window, tmp_path):
    report = merge_checkpoints(window, COEFS, tmp_path / "merged")
    md = ckpt_integrity.load_metadata(window[-1])
    expect = sorted(k for k in md.state_dict_metadata if is_dropped(k))
    assert report.dropped_keys == expect and any(k.startswith("rng_state") for k in expect)
    assert f"dropped {len(expect)} (optimizer and RNG state)" in report.summary()
    assert read_manifest(tmp_path / "merged").extra["provenance"]["dropped"]["count"] == len(expect)
    out_keys = ckpt_integrity.load_metadata(tmp_path / "merged").state_dict_metadata
    assert not [k for k in out_keys if is_dropped(k)]
    assert all(classify(k, v) == ACTION_AVERAGE for k, v in out_keys.items()
               if k in report.averaged_keys)


def test_input_crcs_of_pieces_from_several_ranks_are_combined():
    """An item read in pieces by two ranks: the runs are combined with crc32_combine and
    compared with the zip record; one changed byte in either rank's part is caught."""
    import zlib

    from megatron_wsm.merge.torch_dist import Item, Plan, check_input_crcs

    data = bytes(range(256)) * 40
    item = Item(index=type("I", (), {"fqn": "w"})(), action=ACTION_AVERAGE, out_file="a.distcp",
                newest=("/in/a.distcp", 0, len(data)), sources=[("/in/a.distcp", 0, len(data))],
                in_dtype=torch.bfloat16, numel=len(data) // 2, data_crcs=[zlib.crc32(data)])
    plan = Plan([type("C", (), {"path": Path("/in")})()], [1.0], None, [item], {}, "same", [])
    cut = 2048

    def runs(blob: bytes) -> list[dict]:
        return [{(0, 0): [0, zlib.crc32(blob[:cut]), cut]},
                {(0, 0): [cut, zlib.crc32(blob[cut:]), len(blob) - cut]}]

    check_input_crcs(plan, runs(data))
    for pos in (10, cut + 10):
        rotten = bytearray(data)
        rotten[pos] ^= 1
        with pytest.raises(MergeError, match="CRC-32 mismatch in a.distcp item w"):
            check_input_crcs(plan, runs(bytes(rotten)))
