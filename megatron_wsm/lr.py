"""Learning-rate schedules through megatron-core's ``OptimizerParamScheduler``.

We add one name, ``stable`` (warmup, then the peak LR held to the end: the "S" of WSM), which
is megatron-core's ``constant`` style; and accept ``1-sqrt`` for the WSD decay shape megatron-core
calls ``minus_sqrt``. Like Megatron-LM, the scheduler counts *samples*: warmup and decay lengths
given in iterations are multiplied by the global batch size, and each step advances by it.
"""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_wsm.config import OptimizerSettings

#: ``--lr-decay-style`` values and the megatron-core style each maps to.
DECAY_STYLES = {
    "stable": "constant",
    "constant": "constant",
    "WSD": "WSD",
    "cosine": "cosine",
    "linear": "linear",
    "inverse-square-root": "inverse-square-root",
}

#: ``--lr-wsd-decay-style`` values and the megatron-core name of each.
WSD_DECAY_STYLES = {
    "linear": "linear",
    "cosine": "cosine",
    "exponential": "exponential",
    "1-sqrt": "minus_sqrt",
    "minus_sqrt": "minus_sqrt",
}


def scheduler_kwargs(
    optim: OptimizerSettings, train_iters: int, global_batch_size: int
) -> dict[str, Any]:
    """Keyword arguments of ``OptimizerParamScheduler`` for our settings (pure)."""
    if optim.lr_decay_style not in DECAY_STYLES:
        raise ValueError(
            f"--lr-decay-style {optim.lr_decay_style!r} unknown; choose from {sorted(DECAY_STYLES)}"
        )
    if optim.lr_wsd_decay_style not in WSD_DECAY_STYLES:
        raise ValueError(
            f"--lr-wsd-decay-style {optim.lr_wsd_decay_style!r} unknown; "
            f"choose from {sorted(WSD_DECAY_STYLES)}"
        )
    decay_iters = optim.lr_decay_iters or train_iters
    warmup_iters = optim.lr_warmup_iters
    if warmup_iters >= decay_iters:
        raise ValueError(
            f"--lr-warmup-iters ({warmup_iters}) must be smaller than the decay length "
            f"({decay_iters} iterations: --lr-decay-iters or --train-iters)"
        )
    style = DECAY_STYLES[optim.lr_decay_style]
    wsd_decay_steps = None
    if style == "WSD":
        wsd_iters = optim.lr_wsd_decay_iters
        if wsd_iters is None or wsd_iters <= 0 or wsd_iters > decay_iters - warmup_iters:
            raise ValueError(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters N with 0 < N <= "
                f"{decay_iters - warmup_iters} (decay length minus warmup)"
            )
        wsd_decay_steps = wsd_iters * global_batch_size
    if optim.min_lr > optim.lr:
        raise ValueError(f"--min-lr ({optim.min_lr}) must not exceed --lr ({optim.lr})")
    return dict(
        init_lr=optim.lr_warmup_init,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup_iters * global_batch_size,
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
