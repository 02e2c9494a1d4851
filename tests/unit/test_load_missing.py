"""``--load`` with nothing there: Megatron-LM's fresh start, and what is never "missing".

Megatron-LM (checkpointing.load_checkpoint, core_v0.16.1) starts from random initialization
when the load directory has no tracker file, unless ``--exit-on-missing-checkpoint``. Its
Mixtral script passes ``--load`` equal to ``--save``, so a first run meets an empty (or not yet
created) directory. A directory that holds checkpoints, even broken ones, is not missing: the
load refuses it rather than train from scratch over it.
"""

from __future__ import annotations

import os

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.checkpoint.layout import TRACKER_FILE, holds_no_checkpoint


def test_absent_or_checkpoint_free_directories_hold_no_checkpoint(tmp_path):
    assert holds_no_checkpoint(tmp_path / "not-yet")
    assert holds_no_checkpoint(tmp_path)  # empty
    # What a fresh --save directory gets before its first save: the trainer lock, logs.
    (tmp_path / ".wsm-trainer.lock").write_text("")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out").write_text("x")
    (tmp_path / "wsm_window").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert holds_no_checkpoint(tmp_path)


def test_anything_checkpoint_like_is_not_missing(tmp_path):
    cases = {
        "tracker": lambda d: (d / TRACKER_FILE).write_text("10"),
        "complete_or_not": lambda d: (d / "iter_0000010").mkdir(),
        "in_progress": lambda d: (d / ".tmp-iter_0000010").mkdir(),
        "itself_a_checkpoint": lambda d: (d / ".metadata").write_bytes(b"x"),
        "window_only": lambda d: (d / "wsm_window" / "iter_0000005").mkdir(parents=True),
        "manifest_in_a_child": lambda d: (
            (d / "other").mkdir() or (d / "other" / "wsm_manifest.json").write_text("{}")
        ),
    }
    for name, make in cases.items():
        root = tmp_path / name
        root.mkdir()
        make(root)
        assert not holds_no_checkpoint(root), name
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert not holds_no_checkpoint(a_file)  # refused by the load with its own message
    link = tmp_path / "link"
    os.symlink(tmp_path / "not-there", link)
    assert not holds_no_checkpoint(link)


def test_exit_on_missing_checkpoint_is_megatron_lms_flag():
    cfg, _ = parse_run_config(["--load", "x", "--exit-on-missing-checkpoint"])
    assert cfg.training.exit_on_missing_checkpoint
    assert not parse_run_config([])[0].training.exit_on_missing_checkpoint
    from megatron_wsm.megatron_lm_options import OPTIONS

    assert OPTIONS["--exit-on-missing-checkpoint"] == "0"  # a switch there too
