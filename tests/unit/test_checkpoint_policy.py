"""Pure checkpoint policy (when to save, what to keep) and directory listing/retention."""

from pathlib import Path

import pytest

from megatron_wsm.checkpoint.layout import (
    checkpoint_name,
    full_to_prune,
    in_window,
    list_checkpoints,
    list_window,
    parse_name,
    prune_full_dir,
    prune_window_dir,
    window_to_prune,
)
from megatron_wsm.checkpoint.manager import CheckpointError, resolve_load_dir, should_save
from megatron_wsm.checkpoint.manifest import CheckpointManifest, write_manifest
from megatron_wsm.merge import MergeError, choose_window


def test_should_save_is_iteration_aligned():
    assert [i for i in range(1, 21) if should_save(i, 5)] == [5, 10, 15, 20]
    assert not should_save(0, 5) and not should_save(7, None)


def test_window_keeps_k_plus_one_checkpoints():
    entries = [(i, i * 100) for i in range(2, 21, 2)]
    assert window_to_prune(entries, 20, 2000, 8, None) == [2, 4, 6, 8, 10]
    # token window: keep tokens >= 2000 - 400
    assert window_to_prune(entries, 20, 2000, None, 400) == [2, 4, 6, 8, 10, 12, 14]
    assert window_to_prune(entries, 20, 2000, None, None) == []
    # the newest is never pruned, even with a zero-width window
    assert 20 not in window_to_prune(entries, 20, 2000, 0, None)


def test_full_keep_last():
    assert full_to_prune([10, 30, 20], 2) == [10]
    assert full_to_prune([10], 1) == []
    assert full_to_prune([10, 20], None) == []
    assert full_to_prune([10, 20], 0) == [10]  # never the newest


def _ckpt(root: Path, it: int, kind="window", complete=True, manifest=True) -> Path:
    d = root / checkpoint_name(it)
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    if manifest:
        m = CheckpointManifest(kind=kind, iteration=it, consumed_tokens=it * 10, complete=complete)
        write_manifest(d, m)
    return d


def test_retention_only_touches_complete_checkpoints_of_ours(tmp_path):
    for it in (2, 4, 6, 8, 10):
        _ckpt(tmp_path, it)
    foreign = _ckpt(tmp_path, 1, manifest=False)  # no manifest: not ours / unfinished
    half = _ckpt(tmp_path, 3, complete=False)
    tmp_dir = tmp_path / ".tmp-iter_0000012"
    tmp_dir.mkdir()
    removed = prune_window_dir(tmp_path, 4, None)
    assert sorted(p.name for p in removed) == ["iter_0000002", "iter_0000004"]
    assert foreign.exists() and half.exists() and tmp_dir.exists()
    assert [c.iteration for c in list_window(tmp_path)] == [6, 8, 10]
    listed = {c.path.name: c.complete for c in list_checkpoints(tmp_path)}
    assert listed[".tmp-iter_0000012"] is False and listed["iter_0000003"] is False


def test_full_retention_keeps_newest(tmp_path):
    for it in (5, 10, 15):
        _ckpt(tmp_path, it, kind="full")
    _ckpt(tmp_path, 20, kind="window")
    removed = prune_full_dir(tmp_path, 1)
    assert sorted(p.name for p in removed) == ["iter_0000005", "iter_0000010"]
    assert (tmp_path / "iter_0000015").exists() and (tmp_path / "iter_0000020").exists()


def test_resolve_load_dir_picks_newest_complete(tmp_path):
    _ckpt(tmp_path, 4, kind="full")
    _ckpt(tmp_path, 8, kind="full", manifest=False)
    (tmp_path / ".tmp-iter_0000012").mkdir()
    assert resolve_load_dir(tmp_path).name == "iter_0000004"
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_load_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_load_dir(empty)


def test_corrupt_manifest_is_not_complete(tmp_path):
    d = _ckpt(tmp_path, 4)
    (d / "wsm_manifest.json").write_text("{not json")
    assert list_window(tmp_path) == []
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        resolve_load_dir(d)


# ----------------------------------------------------------------------------- one window rule


def _window_root(root: Path, entries: list[tuple[int, int]]) -> Path:
    for it, tokens in entries:
        d = root / checkpoint_name(it)
        d.mkdir(parents=True)
        m = CheckpointManifest(kind="window", iteration=it, consumed_tokens=tokens, complete=True)
        write_manifest(d, m)
    return root


# Uneven tokens per iteration (a batch-size ramp), so the token and iteration windows differ.
_ENTRIES = [(2, 100), (4, 300), (6, 350), (8, 700), (10, 760), (12, 1000)]


@pytest.mark.parametrize("window_iters", [None, 0, 2, 3, 4, 7, 100])
@pytest.mark.parametrize("window_tokens", [None, 0, 240, 300, 650, 10_000])
def test_trainer_retention_and_merge_selection_agree(tmp_path, window_iters, window_tokens):
    """The checkpoints the trainer keeps are exactly those the merge's --load-dir selects."""
    root = _window_root(tmp_path / "w", _ENTRIES)
    doomed = window_to_prune(_ENTRIES, 12, 1000, window_iters, window_tokens)
    kept = [it for it, _ in _ENTRIES if it not in doomed]
    assert kept[-1] == 12  # the newest is always kept
    try:
        selected = choose_window(root, window_iters=window_iters, window_tokens=window_tokens)
    except MergeError as e:  # a merge needs two; the trainer keeps the newest one alone then
        assert len(kept) < 2 and "holds 1 checkpoint(s)" in str(e)
    else:
        assert selected.iterations == kept
    removed = prune_window_dir(root, window_iters, window_tokens)
    assert sorted(int(p.name[len("iter_"):]) for p in removed) == doomed
    assert [c.iteration for c in list_window(root)] == kept


def test_in_window_is_the_conjunction_of_both_sizes():
    assert in_window(4, 300, 12, 1000, 8, None) and not in_window(2, 100, 12, 1000, 8, None)
    assert not in_window(4, 300, 12, 1000, 8, 650)  # inside by iterations, not by tokens
    assert in_window(12, 1000, 12, 1000, 0, 0)  # the newest, whatever the window


def test_checkpoint_names_round_trip():
    assert parse_name(checkpoint_name(120)) == (120, False)
    assert parse_name(".tmp-" + checkpoint_name(120)) == (120, True)
    assert parse_name("iter_12") is None and parse_name("wsm_window") is None


def test_load_failure_hint_names_the_cause_and_the_way_out():
    from megatron_wsm.checkpoint.manager import load_failure_hint

    assert load_failure_hint("shape mismatch", loading_optimizer=False) == ""
    layout = load_failure_hint("some sharding error", loading_optimizer=True)
    assert "parallel layout" in layout and "--no-load-optim --no-load-rng" in layout
    # megatron-core 0.19's message when the peak LR differs from the checkpoint's
    groups = load_failure_hint(
        "Could not find parameter group with key (None, 0.002, 0.0, ...) in loaded checkpoint.",
        loading_optimizer=True,
    )
    assert "--lr" in groups and "parallel layout" not in groups
    assert "--no-load-optim --no-load-rng" in groups


def test_weights_finite_sees_one_bad_value_in_any_chunk():
    """The save-side guard: one NaN or inf anywhere in any model chunk refuses the save."""
    import torch

    from megatron_wsm.checkpoint.manager import _weights_finite

    chunks = [torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)]
    assert _weights_finite(chunks)
    with torch.no_grad():
        chunks[1].bias[1] = float("inf")
    assert not _weights_finite(chunks)
    assert _weights_finite([])
