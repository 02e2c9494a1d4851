"""Going on from a stable checkpoint with another --train-iters (the README's "go on training
from the stable checkpoint"), decaying it with WSD, and a real schedule conflict refused."""

from __future__ import annotations

import pytest

from megatron_wsm.config import OptimizerSettings
from megatron_wsm.lr import lr_curve
from tests.helpers import TINY_MODEL, losses, run_pretrain, run_script

pytestmark = pytest.mark.distributed

LR = ["--lr", "1e-3", "--lr-warmup-iters", "2"]


def _lrs(result) -> list[float]:
    return [h["lr"] for h in result["train_history"]]


def test_stable_run_goes_on_longer_or_decays(data_cache, tmp_path):
    common = [*TINY_MODEL, *LR, "--data-cache-dir", data_cache]
    stable = [*common, "--lr-decay-style", "stable"]
    ckpt = tmp_path / "ckpt"
    first = run_pretrain([*stable, "--train-iters", "4", "--save", ckpt], tmp_path / "a.json")
    stable_settings = OptimizerSettings(lr=1e-3, lr_warmup_iters=2, lr_decay_style="stable")
    assert _lrs(first) == pytest.approx(lr_curve(stable_settings, 4, 4), rel=1e-6)

    longer = run_pretrain(
        [*stable, "--train-iters", "8", "--load", ckpt, "--save", tmp_path / "b"],
        tmp_path / "b.json",
    )
    assert [h["iteration"] for h in longer["train_history"]] == [5, 6, 7, 8]
    assert _lrs(longer) == [1e-3] * 4
    straight = run_pretrain([*stable, "--train-iters", "8"], tmp_path / "s.json")
    assert _lrs(first) + _lrs(longer) == _lrs(straight)
    # Same weights, optimizer state, RNG and data order: bitwise the run that never stopped.
    # (The data order holds because 16 and 32 samples both fit in one epoch of the corpus:
    # GPTDataset shuffles documents over all the epochs --train-iters needs, so a resumed run
    # that needs more epochs than the first one would see another sample order.)
    assert losses(first) + losses(longer) == losses(straight)

    # Decaying it instead (the checkpoint lies before the decay starts): WSD over 2 of 8.
    wsd = ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", "2"]
    decayed = run_pretrain(
        [*common, *wsd, "--train-iters", "8", "--load", ckpt, "--save", tmp_path / "c"],
        tmp_path / "c.json",
    )
    settings = OptimizerSettings(
        lr=1e-3,
        lr_warmup_iters=2,
        lr_decay_style="WSD",
        lr_wsd_decay_style="linear",
        lr_wsd_decay_iters=2,
    )
    assert _lrs(decayed) == pytest.approx(lr_curve(settings, 8, 4)[4:], rel=1e-6)
    assert _lrs(decayed)[-1] < 1e-3
    # ... bitwise the WSD run trained from scratch (what examples/wsm_vs_wsd.sh relies on when
    # it branches its WSD run off the stable run's checkpoint at the decay start).
    wsd_straight = run_pretrain([*common, *wsd, "--train-iters", "8"], tmp_path / "w.json")
    assert losses(first) + losses(decayed) == losses(wsd_straight)

    # A real conflict (another peak LR) is still refused, naming the two ways out.
    proc = run_script(
        "pretrain_moe.py",
        [*stable, "--lr", "2e-3", "--train-iters", "8", "--load", ckpt],
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "--lr: checkpoint 0.001, this run 0.002" in err
    assert "--override-opt-param-scheduler" in err
    assert "--use-checkpoint-opt-param-scheduler" in err
