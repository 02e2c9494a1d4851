"""LR schedules as the trainer uses them (megatron-core's OptimizerParamScheduler)."""

import math

import pytest

from megatron_wsm.config import OptimizerSettings
from megatron_wsm.lr import lr_curve, scheduler_kwargs


def _settings(**kw):
    base = dict(lr=1e-3, min_lr=1e-5, lr_warmup_iters=10)
    base.update(kw)
    return OptimizerSettings(**base)


@pytest.mark.parametrize("style", ["stable", "constant"])
def test_stable_holds_peak_after_warmup(style):
    lrs = lr_curve(_settings(lr_decay_style=style), train_iters=100, global_batch_size=8)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3)  # linear warmup
    assert all(lr == 1e-3 for lr in lrs[10:])


@pytest.mark.parametrize(
    "shape,f",
    [
        ("linear", lambda t: 1 - t),
        ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
        ("1-sqrt", lambda t: 1 - math.sqrt(t)),
        ("exponential", lambda t: 2 * 0.5**t - 1),
    ],
)
def test_wsd_decays_over_requested_iters_with_shape(shape, f):
    s = _settings(lr_decay_style="WSD", lr_wsd_decay_style=shape, lr_wsd_decay_iters=20)
    lrs = lr_curve(s, train_iters=100, global_batch_size=4)
    # Stable until iteration 80 (index 80 = LR after 80 steps), then the shape to min_lr.
    assert all(lr == 1e-3 for lr in lrs[10:81])
    for i in range(81, 100):
        t = (i - 80) / 20
        assert lrs[i] == pytest.approx(1e-5 + (1e-3 - 1e-5) * f(t), rel=1e-9)
    assert lrs[-1] < lrs[85] < 1e-3


def test_cosine_reaches_min_lr():
    lrs = lr_curve(_settings(lr_decay_style="cosine"), train_iters=50, global_batch_size=2)
    assert lrs[10] == pytest.approx(1e-3)
    assert 1e-5 <= lrs[-1] < 1.2e-5  # one step before the end of the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(lr_decay_style="WSD"), "--lr-wsd-decay-iters"),
        (dict(lr_decay_style="WSD", lr_wsd_decay_iters=500), "--lr-wsd-decay-iters"),
        (dict(lr_decay_style="nope"), "--lr-decay-style"),
        (dict(lr_wsd_decay_style="nope"), "--lr-wsd-decay-style"),
        (dict(lr_warmup_iters=100), "--lr-warmup-iters"),
        (dict(min_lr=1.0), "--min-lr"),
    ],
)
def test_bad_schedules_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        scheduler_kwargs(_settings(**kw), train_iters=100, global_batch_size=4)
