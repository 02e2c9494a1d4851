"""A tiny MoE that trains in seconds on 2 CPU cores: as trainer flags and as a RunConfig."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_wsm.config import RunConfig

#: Trainer flags of the tiny MoE (add --train-iters, --save, ... per test).
TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--vocab-size",
    "512",
    "--log-interval",
    "1",
    "--eval-interval",
    "0",
    "--eval-iters",
    "2",
    "--no-progress-bar",
]


def tiny_run_config(*extra: str | int, argv: Sequence[str] = ()) -> RunConfig:
    """The tiny MoE's :class:`RunConfig` from the trainer's own parser, with ``extra`` flags
    (e.g. ``"--train-iters", 4``) after :data:`TINY_MODEL`; not validated against a world."""
    from megatron_wsm.arguments import parse_run_config

    cfg, _ = parse_run_config([*TINY_MODEL, *map(str, extra), *argv])
    return cfg
