"""Learning-rate schedules through megatron-core's ``OptimizerParamScheduler``.

We add one name, ``stable`` (warmup, then the peak LR held to the end: the "S" of WSM), which
is megatron-core's ``constant`` style; and accept ``1-sqrt`` for the WSD decay shape megatron-core
calls ``minus_sqrt`` (the name tables are in ``lr_styles.py``). Like Megatron-LM, the scheduler
counts *samples*: warmup and decay lengths given in iterations are multiplied by the global batch
size, and each step advances by it.
"""

from __future__ import annotations

from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_wsm.config import OptimizerSettings
from megatron_wsm.lr_styles import DECAY_STYLES, WSD_DECAY_STYLES


def scheduler_kwargs(
    optim: OptimizerSettings, train_iters: int, global_batch_size: int
) -> dict[str, Any]:
    """Keyword arguments of ``OptimizerParamScheduler`` for our settings (pure).

    Raises :class:`~megatron_wsm.config.ConfigError` (a ``ValueError``) for a schedule
    megatron-core would not accept: :meth:`OptimizerSettings.validate` holds those checks.
    """
    optim.validate(train_iters)
    decay_iters = optim.decay_iters(train_iters)
    style = DECAY_STYLES[optim.lr_decay_style]
    wsd_decay_steps = None
    if style == "WSD":
        assert optim.lr_wsd_decay_iters is not None  # validate()
        wsd_decay_steps = optim.lr_wsd_decay_iters * global_batch_size
    return dict(
        init_lr=optim.lr_warmup_init,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters * global_batch_size,
        lr_decay_steps=decay_iters * global_batch_size,
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters * global_batch_size,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=optim.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=optim.override_opt_param_scheduler,
        wsd_decay_steps=wsd_decay_steps,
        lr_wsd_decay_style=WSD_DECAY_STYLES[optim.lr_wsd_decay_style],
    )


def build_scheduler(
    optimizer: Any, optim: OptimizerSettings, train_iters: int, global_batch_size: int
) -> OptimizerParamScheduler:
    """megatron-core's scheduler driving ``optimizer``'s param groups."""
    return OptimizerParamScheduler(
        optimizer, **scheduler_kwargs(optim, train_iters, global_batch_size)
    )


class _ParamGroupsOnly:
    """Just enough of an optimizer for the scheduler to write LRs into."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = [{}]


def lr_curve(optim: OptimizerSettings, train_iters: int, global_batch_size: int) -> list[float]:
    """LR used at each iteration 1..train_iters, computed by megatron-core's scheduler itself.

    Iteration ``i`` trains with the LR the scheduler holds after ``i - 1`` steps, as in the loop.
    """
    holder = _ParamGroupsOnly()
    sched = OptimizerParamScheduler(
        holder, **scheduler_kwargs(optim, train_iters, global_batch_size)
    )
    lrs = []
    for _ in range(train_iters):
        lrs.append(float(holder.param_groups[0]["lr"]))
        sched.step(increment=global_batch_size)
    return lrs


# ----------------------------------------------------------------------------- resuming

#: Decay styles whose LR after warmup depends on the decay length at every step.
_LENGTH_DEPENDENT = ("linear", "cosine", "inverse-square-root")


def scheduler_state(sched: OptimizerParamScheduler) -> dict[str, Any]:
    """megatron-core's scheduler state plus the fields it leaves out that decide the LR
    (warmup start, WSD decay length and shape), so a resumed run can compare them."""
    state = dict(sched.state_dict())
    state["init_lr"] = sched.init_lr
    state["wsd_decay_steps"] = sched.wsd_decay_steps
    state["lr_wsd_decay_style"] = sched.lr_wsd_decay_style
    return state


def _phase(state: dict[str, Any], steps: int) -> str:
    """Where ``steps`` lies in a schedule: ``warmup``, ``flat`` (the LR is the peak and stays
    so whatever the run's length: constant, or WSD before its decay starts) or ``decay``."""
    warmup = int(state["lr_warmup_steps"])
    if warmup > 0 and steps < warmup:
        return "warmup"
    style = state["lr_decay_style"]
    if style == "constant":
        return "flat"
    if style == "WSD":
        wsd = state.get("wsd_decay_steps")
        if wsd is None:  # an older checkpoint that did not record it: cannot tell
            return "decay"
        return "flat" if steps <= int(state["lr_decay_steps"]) - int(wsd) else "decay"
    return "decay"


def schedule_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why this run's LR schedule cannot take over from a checkpoint's (empty: it can).

    ``saved`` is the checkpoint's scheduler state (with ``num_steps``, the samples trained so
    far), ``current`` this command line's (:func:`scheduler_state` of both). Only what changes
    the LR of the resumed steps matters, so a run in a flat phase (stable, or WSD before its
    decay starts) under both schedules may change its length (``--train-iters``,
    ``--lr-decay-iters``, the WSD decay length, stable → WSD): that is continuing or decaying a
    stable run. A different peak LR, a warmup not finished under one of them, or a decay
    already under way under either (cosine with another length, WSD already decaying) is a
    conflict. Weight decay must match too.
    """
    steps = int(saved["num_steps"])
    problems: list[str] = []

    def differs(key: str, what: str) -> None:
        if key in saved and key in current and saved[key] != current[key]:
            problems.append(f"{what}: checkpoint {saved[key]!r}, this run {current[key]!r}")

    differs("max_lr", "--lr")
    differs("start_wd", "--weight-decay (start)")
    differs("end_wd", "--weight-decay (end)")
    if current["start_wd"] != current["end_wd"]:
        differs("wd_incr_steps", "weight-decay increment length")
        differs("wd_incr_style", "weight-decay increment style")
    phases = (_phase(saved, steps), _phase(current, steps))
    if "warmup" in phases:
        differs("lr_warmup_steps", "--lr-warmup-iters (in samples; warmup not finished)")
        differs("init_lr", "--lr-warmup-init")
        if saved["lr_warmup_steps"] == current["lr_warmup_steps"]:
            # Same warmup: what follows it must still agree unless it is flat in both.
            after = int(saved["lr_warmup_steps"])
            phases = (_phase(saved, after), _phase(current, after))
    if "decay" in phases:
        differs("lr_decay_style", "--lr-decay-style (a decay is under way)")
        differs("lr_decay_steps", "decay length in samples (--lr-decay-iters or --train-iters)")
        differs("min_lr", "--min-lr")
        if "WSD" in (saved["lr_decay_style"], current["lr_decay_style"]):
            if saved.get("wsd_decay_steps") is None:
                problems.append(
                    "the checkpoint does not record its WSD decay length, so a WSD decay "
                    "under way cannot be checked"
                )
            differs("wsd_decay_steps", "--lr-wsd-decay-iters (in samples)")
            differs("lr_wsd_decay_style", "--lr-wsd-decay-style")
    return problems
