"""Adam and the LR schedule: :class:`OptimizerSettings`."""

from __future__ import annotations

import dataclasses

from megatron_wsm.config.fields import ConfigError, flag_field
from megatron_wsm.lr_styles import DECAY_STYLES, WSD_DECAY_STYLES


@dataclasses.dataclass
class OptimizerSettings:
    """Adam hyper-parameters and the LR schedule."""

    GROUP = "optimizer and learning rate"

    optimizer: str = flag_field(
        "adam",
        "Megatron-LM's adam (decoupled weight decay, megatron-core's optimizer); sgd is not "
        "supported: the checkpoints and WSM window hold Adam's state",
        choices=["adam"],
    )
    lr: float = flag_field(1e-3, "peak learning rate")
    min_lr: float = flag_field(0.0, "LR at the end of a decay")
    lr_warmup_iters: int = flag_field(0)
    lr_warmup_init: float = flag_field(0.0)
    lr_decay_style: str = flag_field(
        "stable",
        "stable (= constant): warmup then peak LR to the end, for WSM; WSD: stable then "
        "a decay over --lr-wsd-decay-iters",
        choices=sorted(DECAY_STYLES),
    )
    lr_decay_iters: int | None = flag_field(None, "default: --train-iters")
    #: linear | cosine | exponential | 1-sqrt (alias minus_sqrt)
    lr_wsd_decay_style: str = flag_field("1-sqrt", choices=sorted(WSD_DECAY_STYLES))
    lr_wsd_decay_iters: int | None = flag_field(None)
    weight_decay: float = flag_field(0.1)
    adam_beta1: float = flag_field(0.9)
    adam_beta2: float = flag_field(0.95)
    adam_eps: float = flag_field(1e-8)
    clip_grad: float = flag_field(1.0)
    override_opt_param_scheduler: bool = flag_field(
        False,
        "on --load, use the schedule given on this command line, not the checkpoint's "
        "(continue a stable run with a decay)",
    )
    use_checkpoint_opt_param_scheduler: bool = flag_field(False)

    def decay_iters(self, train_iters: int) -> int:
        """Iterations from the start to the end of the decay: ``--lr-decay-iters``, else
        ``--train-iters`` (Megatron-LM's default)."""
        return self.lr_decay_iters or train_iters

    def validate(self, train_iters: int) -> None:
        """The schedule must be one megatron-core's ``OptimizerParamScheduler`` accepts (the
        checks ``lr.scheduler_kwargs`` relies on, made here so that they need no megatron-core).
        """
        if self.lr_decay_style not in DECAY_STYLES:
            raise ConfigError(
                f"--lr-decay-style {self.lr_decay_style!r} unknown; "
                f"choose from {sorted(DECAY_STYLES)}"
            )
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(
                f"--lr-wsd-decay-style {self.lr_wsd_decay_style!r} unknown; "
                f"choose from {sorted(WSD_DECAY_STYLES)}"
            )
        decay_iters = self.decay_iters(train_iters)
        warmup_iters = self.lr_warmup_iters
        if warmup_iters >= decay_iters:
            raise ConfigError(
                f"--lr-warmup-iters ({warmup_iters}) must be smaller than the decay length "
                f"({decay_iters} iterations: --lr-decay-iters or --train-iters)"
            )
        if DECAY_STYLES[self.lr_decay_style] == "WSD":
            wsd_iters = self.lr_wsd_decay_iters
            if wsd_iters is None or wsd_iters <= 0 or wsd_iters > decay_iters - warmup_iters:
                raise ConfigError(
                    "--lr-decay-style WSD needs --lr-wsd-decay-iters N with 0 < N <= "
                    f"{decay_iters - warmup_iters} (decay length minus warmup)"
                )
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
