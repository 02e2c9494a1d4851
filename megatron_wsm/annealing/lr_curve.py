"""LR curves in numpy: the trainer's scheduler and the curve a WSM merge emulates.

Decay shapes come from :mod:`megatron_wsm.coefficients` (their one definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_wsm.annealing.law import _as_lrs
from megatron_wsm.coefficients import MergeMethod, shape_function

#: WSD decay shapes of the trainer (``--lr-wsd-decay-style``).
WSD_SHAPES = ("linear", "cosine", "exponential", "1-sqrt")


def trainer_lr_curve(
    *,
    train_iters: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_iters: int = 0,
    init_lr: float = 0.0,
    style: str = "stable",
    decay_iters: int | None = None,
    wsd_decay_iters: int | None = None,
    wsd_shape: str = "1-sqrt",
    global_batch_size: int = 1,
) -> np.ndarray:
    """LR of iterations 1..train_iters as the trainer's scheduler gives it, in numpy.

    A vectorised twin of megatron-core's ``OptimizerParamScheduler.get_lr`` as driven by
    :func:`megatron_wsm.lr.lr_curve` (iteration i uses the LR after ``(i-1)·gbs`` samples);
    the tests check it against the real scheduler. Exists so a search over hundreds of
    schedules of 10^5 steps takes seconds and this module needs no megatron-core.
    ``style``: stable|constant|WSD|cosine|linear|inverse-square-root.
    """
    if train_iters < 1:
        raise ValueError(f"train_iters must be >= 1, got {train_iters}")
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed lr ({lr})")
    g = int(global_batch_size)
    n = np.arange(train_iters, dtype=np.float64) * g  # samples consumed before iteration i
    w_steps = float(warmup_iters * g)
    d_steps = float((decay_iters or train_iters) * g)
    if warmup_iters >= (decay_iters or train_iters):
        raise ValueError("warmup_iters must be smaller than the decay length")
    delta = lr - min_lr
    if style in ("stable", "constant"):
        out = np.full(train_iters, float(lr))
    elif style == "inverse-square-root":
        ws = max(w_steps, 1.0)
        out = np.maximum(min_lr, lr * ws**0.5 / np.maximum(n, 1.0) ** 0.5)
    elif style in ("linear", "cosine", "WSD"):
        ratio = np.clip((n - w_steps) / (d_steps - w_steps), 0.0, 1.0)
        if style == "linear":
            coeff = 1.0 - ratio
        elif style == "cosine":
            coeff = 0.5 * (np.cos(np.pi * ratio) + 1.0)
        else:
            if wsd_decay_iters is None or not 0 < wsd_decay_iters <= (
                (decay_iters or train_iters) - warmup_iters
            ):
                raise ValueError(
                    "WSD needs 0 < wsd_decay_iters <= decay length minus warmup, got "
                    f"{wsd_decay_iters}"
                )
            wd = float(wsd_decay_iters * g)
            start = d_steps - wd
            t = np.clip((n - start) / wd, 0.0, 1.0)
            coeff = np.where(n <= start, 1.0, _wsd_coeff(wsd_shape, t))
        out = min_lr + coeff * delta
        out = np.where(n > d_steps, min_lr, out)
    else:
        raise ValueError(f"unknown LR style {style!r}")
    if warmup_iters > 0:
        warm = n <= w_steps
        out = np.where(warm, init_lr + (lr - init_lr) * n / w_steps, out)
    return out


# The trainer's --lr-wsd-decay-style names -> megatron_wsm.coefficients shape names (same f).
_WSD_TO_SHAPE = {
    "linear": "linear",
    "cosine": "cosine",
    "exponential": "wsd-exponential",
    "1-sqrt": "1-sqrt",
    "minus_sqrt": "1-sqrt",
}


def _wsd_coeff(shape: str, t: np.ndarray) -> np.ndarray:
    """The trainer's WSD decay factor at decay fractions ``t``: the shape f, unclamped."""
    if shape not in _WSD_TO_SHAPE:
        raise ValueError(f"unknown WSD decay shape {shape!r}; choose from {WSD_SHAPES}")
    f = shape_function(_WSD_TO_SHAPE[shape], xp=np)
    out = np.ones_like(t)
    live = t > 0  # only the decay part needs f; the rest is t = 0 -> 1
    out[live] = f(t[live])
    return out


def merge_lrs(
    base_lrs: Sequence[float] | np.ndarray,
    window_iters: int,
    method: str | MergeMethod = "1-sqrt",
    *,
    interval: int | None = None,
    **method_kwargs: Any,
) -> np.ndarray:
    """The LR curve a WSM merge over the last ``window_iters`` steps of ``base_lrs`` emulates.

    The window holds k = window_iters / interval intervals (``interval`` default: the whole
    window in 8 intervals, rounded; 1 = a checkpoint every step). By Theorem 3.1 merging with
    the coefficients of ``method`` scales the updates of interval i by its decay weight
    w_i (:meth:`megatron_wsm.coefficients.MergeMethod.decay_weights`, w_i = f((i-1)/k)), so the
    emulated LR is ``base_lrs × w_i`` over interval i. Its :func:`final_loss` predicts the
    merged model. ``method`` is a :class:`~megatron_wsm.coefficients.MergeMethod` or a method name
    with its parameters in ``method_kwargs`` (``alpha``, ``final_ratio``, ``min_lr_ratio``).
    """
    if isinstance(method, MergeMethod):
        if method_kwargs:
            raise ValueError("give the merge parameters in the MergeMethod, not as keywords")
        merge = method
    else:
        merge = MergeMethod(method, **method_kwargs)
    base = _as_lrs(base_lrs).copy()
    if not 1 <= window_iters <= base.size:
        raise ValueError(f"window_iters must be in [1, {base.size}], got {window_iters}")
    if interval is None:
        interval = max(1, int(round(window_iters / 8)))
    if interval < 1 or window_iters % interval:
        raise ValueError(
            f"the window ({window_iters} steps) must be a whole number of intervals "
            f"({interval} steps each)"
        )
    k = window_iters // interval
    w = np.repeat(np.asarray(merge.decay_weights(k)), interval)
    base[base.size - window_iters :] *= w
    return base
