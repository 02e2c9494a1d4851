"""Which LR schedule changes a resumed run may make (lr.schedule_conflicts)."""

from __future__ import annotations

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_wsm.config import OptimizerSettings
from megatron_wsm.lr import _ParamGroupsOnly, lr_curve, schedule_conflicts, scheduler_kwargs
from megatron_wsm.lr import scheduler_state as state_of

GBS = 4


def _state(train_iters: int, trained_iters: int = 0, **kw) -> dict:
    """The scheduler state of a run of ``train_iters`` after ``trained_iters`` iterations."""
    base = dict(lr=1e-3, min_lr=1e-5, lr_warmup_iters=10, lr_decay_style="stable")
    base.update(kw)
    sched = OptimizerParamScheduler(
        _ParamGroupsOnly(), **scheduler_kwargs(OptimizerSettings(**base), train_iters, GBS)
    )
    if trained_iters:
        sched.step(increment=trained_iters * GBS)
    return state_of(sched)


def test_longer_stable_run_is_no_conflict():
    assert schedule_conflicts(_state(100, 50), _state(2000)) == []
    assert schedule_conflicts(_state(100, 100), _state(40_000)) == []


def test_stable_then_wsd_decay_before_it_starts_is_no_conflict():
    wsd = dict(lr_decay_style="WSD", lr_wsd_decay_iters=100)
    assert schedule_conflicts(_state(100, 100), _state(300, **wsd)) == []
    # ... and a decay that would already be under way at the checkpoint is one.
    problems = schedule_conflicts(_state(100, 100), _state(150, **wsd))
    assert any("--lr-decay-style" in p for p in problems)


def test_wsd_made_longer_while_stable_is_no_conflict_but_not_while_decaying():
    wsd = dict(lr_decay_style="WSD", lr_wsd_decay_iters=20)
    assert schedule_conflicts(_state(100, 50, **wsd), _state(200, **wsd)) == []
    assert schedule_conflicts(_state(100, 80, **wsd), _state(200, **wsd)) == []  # 80 = start
    problems = schedule_conflicts(_state(100, 81, **wsd), _state(200, **wsd))
    assert any("decay length" in p for p in problems)
    # The same schedule resumes mid-decay.
    assert schedule_conflicts(_state(100, 90, **wsd), _state(100, **wsd)) == []


def test_different_peak_lr_is_a_conflict():
    problems = schedule_conflicts(_state(100, 50), _state(100, lr=2e-3))
    assert problems == ["--lr: checkpoint 0.001, this run 0.002"]


def test_different_warmup_matters_only_while_unfinished():
    assert schedule_conflicts(_state(100, 50), _state(100, lr_warmup_iters=20)) == []
    problems = schedule_conflicts(_state(100, 5), _state(100, lr_warmup_iters=20))
    assert any("--lr-warmup-iters" in p for p in problems)


def test_cosine_with_another_length_is_a_conflict_even_at_the_end_of_warmup():
    cos = dict(lr_decay_style="cosine")
    for trained in (5, 10, 50):
        problems = schedule_conflicts(_state(100, trained, **cos), _state(200, **cos))
        assert any("decay length" in p for p in problems), trained
    assert schedule_conflicts(_state(100, 50, **cos), _state(100, **cos)) == []


def test_no_conflict_means_the_resumed_lrs_are_the_new_schedules():
    """What the check allows must be exact: the new run's curve agrees with the old one's
    everywhere up to the checkpoint."""
    cases = [
        (dict(), dict(), 100, 2000, 100),
        (dict(), dict(lr_decay_style="WSD", lr_wsd_decay_iters=50), 100, 400, 100),
        (
            dict(lr_decay_style="WSD", lr_wsd_decay_iters=20),
            dict(lr_decay_style="WSD", lr_wsd_decay_iters=30),
            100,
            300,
            60,
        ),
    ]
    for old, new, old_iters, new_iters, trained in cases:
        assert schedule_conflicts(_state(old_iters, trained, **old), _state(new_iters, **new)) == []
        s_old = OptimizerSettings(
            lr=1e-3, min_lr=1e-5, lr_warmup_iters=10, **{"lr_decay_style": "stable", **old}
        )
        s_new = OptimizerSettings(
            lr=1e-3, min_lr=1e-5, lr_warmup_iters=10, **{"lr_decay_style": "stable", **new}
        )
        n = min(trained + 1, old_iters)  # through the LR of the first resumed iteration
        a = lr_curve(s_old, old_iters, GBS)[:n]
        b = lr_curve(s_new, new_iters, GBS)[:n]
        assert a == b


@pytest.mark.parametrize("key", ["wsd_decay_steps", "lr_wsd_decay_style", "init_lr"])
def test_state_records_what_megatron_core_leaves_out(key):
    assert key in _state(100, lr_decay_style="WSD", lr_wsd_decay_iters=20)


def _manager_with(sched):
    from megatron_wsm.checkpoint.manager import CheckpointManager

    return CheckpointManager([], None, sched, None, {}, 0)


def _scheduler(train_iters: int, **kw) -> OptimizerParamScheduler:
    base = dict(lr=1e-3, min_lr=1e-5, lr_warmup_iters=10, lr_decay_style="stable")
    base.update(kw)
    return OptimizerParamScheduler(
        _ParamGroupsOnly(), **scheduler_kwargs(OptimizerSettings(**base), train_iters, GBS)
    )


def test_manager_loads_a_longer_stable_run_at_the_checkpoints_position():
    sched = _scheduler(2000)
    _manager_with(sched)._load_scheduler(_state(100, 100))
    assert sched.num_steps == 100 * GBS and sched.lr_decay_steps == 2000 * GBS
    assert sched.optimizer.param_groups[0]["lr"] == 1e-3


def test_manager_refuses_a_real_conflict_with_the_two_ways_out():
    from megatron_wsm.checkpoint.manager import CheckpointError

    with pytest.raises(CheckpointError, match="--override-opt-param-scheduler.*--use-checkpoint"):
        _manager_with(_scheduler(100, lr=2e-3))._load_scheduler(_state(100, 50))


def test_use_checkpoint_scheduler_takes_the_wsd_decay_too():
    wsd = dict(lr_decay_style="WSD", lr_wsd_decay_style="linear")
    sched = _scheduler(200, use_checkpoint_opt_param_scheduler=True, lr_wsd_decay_iters=50, **wsd)
    _manager_with(sched)._load_scheduler(_state(100, 90, lr_wsd_decay_iters=20, **wsd))
    assert sched.wsd_decay_steps == 20 * GBS and sched.lr_decay_steps == 100 * GBS
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
