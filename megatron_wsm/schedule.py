"""WSM schedule math: learning-rate decay shapes <-> checkpoint-merge coefficients.

(Over ~600 lines on purpose: the shapes, the two maps, the methods and their input checks are
one closely-knit unit; uneven windows and MergeMethod live in their own modules.)

Pure Python on ``float`` (IEEE float64); nothing here needs torch or numpy, but any
sequence of real numbers (lists, tuples, numpy arrays) is accepted as input.

Setting (derivations and worked examples: docs/schedule.md). A merge window holds k+1
checkpoints θ_n, θ_{n+1}, …, θ_{n+k} saved every ``interval`` steps at a constant learning
rate η (θ_n the oldest). Interval i (1 ≤ i ≤ k) is the stretch of training from θ_{n+i-1}
to θ_{n+i}. A decay schedule
scales the learning rate of interval i by w_i, and merging with coefficients c_j gives

    Σ_j c_j θ_{n+j} = θ_n - η Σ_i (Σ_{j≥i} c_j) · (sum of the gradients of interval i)

so the merge equals the decayed run iff w_i = Σ_{j≥i} c_j. Inverting it
(Theorem 3.1 of the WSM paper):

    c_k = w_k,    c_j = w_j - w_{j+1}  (1 ≤ j < k),    c_0 = 1 - w_1.

Coefficients are always listed oldest checkpoint first (c_0 … c_k, length k+1); decay
weights are w_1 … w_k (length k).

Default discretisation (stable; other modules and saved provenance rely on it):

    w_i = f((i - 1) / k),   i = 1 … k,

with f: [0, 1] → [0, 1] the decay shape, f(0) = 1. This is the learning rate Megatron's
WSD scheduler applies at the *start* of interval i when its decay phase spans the k
intervals (the optimizer step after ``num_steps`` updates uses the LR computed for
``num_steps``), so w_1 = 1 and c_0 = 0: the oldest checkpoint only anchors the window.
Under it linear decay is exactly the plain mean of the newest k checkpoints.

A floor ``min_lr_ratio`` r turns any decay w into r + (1 - r)·w (Megatron's
``min_lr + coeff·(max_lr - min_lr)`` with r = min_lr / max_lr); in coefficient space it
is c ↦ (1 - r)·c + r·[newest checkpoint].

Conventions (``convention=``). ``"wsm"`` is the default above. ``"megatron-lm"`` is the
discretisation of Megatron-LM's ``tools/checkpoint/weighted_merge.py``: w_i = f(i/(k+1)),
i.e. the decay starts one interval *before* the oldest checkpoint, so every input gets
weight (``mean`` is 1/(k+1) each, ``linear`` too). It equals the ``"wsm"`` coefficients of
k+1 intervals with the (zero-weight) anchor dropped.

Uneven windows (:func:`merge_coefficients_at`). With checkpoints at positions
p_0 < … < p_k (iterations or consumed tokens) the shape is evaluated at the real window
fractions t_j = (p_j - p_0)/(p_k - p_0): ``sampling="start"`` takes w_i = f(t_{i-1}) (the
default discretisation, exactly; evenly spaced positions take the index path above),
``sampling="mean"`` the average of f over [t_{i-1}, t_i].
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "DEFAULT_EMA_ALPHA",
    "DEFAULT_FINAL_RATIO",
    "DEFAULT_METHOD",
    "DEFAULT_TOL",
    "DIRECT_METHODS",
    "FINAL_RATIO_METHODS",
    "FORMULAS",
    "MergeMethod",
    "MAIN_METHODS",
    "METHODS",
    "SAMPLINGS",
    "SHAPE_METHODS",
    "coefficients_from_decay",
    "decay_from_coefficients",
    "decay_shape",
    "decay_weights",
    "decay_weights_at",
    "describe_convention",
    "discretisation",
    "is_evenly_spaced",
    "load_custom",
    "merge_coefficients",
    "merge_coefficients_at",
    "shape_function",
    "validate_coefficients",
    "window_fractions",
]

#: Methods defined by a decay shape f(t), discretised as w_i = f((i-1)/k).
SHAPE_METHODS: tuple[str, ...] = (
    "linear",
    "cosine",
    "1-sqrt",
    "inverse-sqrt",
    "exponential",
    "wsd-exponential",
    "constant",
)
#: Methods defined directly by their merge coefficients.
DIRECT_METHODS: tuple[str, ...] = ("mean", "ema")
#: Every method name a command line accepts (argparse ``choices``), in display order.
#: ``custom`` needs explicit ``coefficients=`` or ``decay=``.
METHODS: tuple[str, ...] = (
    "linear",
    "cosine",
    "1-sqrt",
    "inverse-sqrt",
    "exponential",
    "wsd-exponential",
    "mean",
    "ema",
    "constant",
    "custom",
)
#: The methods drawn in ``docs/wsm_weights_k8.png``.
MAIN_METHODS: tuple[str, ...] = (
    "linear",
    "cosine",
    "1-sqrt",
    "inverse-sqrt",
    "exponential",
    "mean",
    "ema",
)

#: Default rho = f(1) per method. ``exponential``: the LR ends the window 10x lower.
#: ``inverse-sqrt``: 1/3, i.e. f(t) = 1/√(1 + 8t), an η/√step schedule over steps S … 9S
#: (for k = 8 exactly w_i = 1/√i); a 10x drop would put most weight on θ_{n+1}.
DEFAULT_FINAL_RATIO: Mapping[str, float] = MappingProxyType(
    {"exponential": 0.1, "inverse-sqrt": 1.0 / 3.0}
)
#: Default alpha for ``ema`` (weight of the newest checkpoint).
DEFAULT_EMA_ALPHA = 0.2
#: Absolute tolerance for "sums to 1", "non-negative" and "inside [0, 1]".
DEFAULT_TOL = 1e-9

#: One-line formula of every method, for tables, plots and provenance.
FORMULAS: Mapping[str, str] = MappingProxyType(
    {
        "linear": "f(t) = 1 - t",
        "cosine": "f(t) = (1 + cos(pi t)) / 2",
        "1-sqrt": "f(t) = 1 - sqrt(t)",
        "inverse-sqrt": "f(t) = 1 / sqrt(1 + (rho^-2 - 1) t), rho = f(1)",
        "exponential": "f(t) = rho^t, rho = f(1)",
        "wsd-exponential": "f(t) = 2 * 0.5^t - 1",
        "constant": "f(t) = 1 (newest checkpoint only)",
        "mean": "c_0 = 0, c_j = 1/k",
        "ema": "c_0 = (1-a)^k, c_j = a (1-a)^(k-j)",
        "custom": "explicit coefficients or decay",
    }
)

_FINAL_RATIO_METHODS = ("exponential", "inverse-sqrt")

#: Discretisation conventions: ``wsm`` (default, w_i = f((i-1)/k)) and ``megatron-lm``
#: (w_i = f(i/(k+1)), as Megatron-LM's ``tools/checkpoint/weighted_merge.py``).
CONVENTIONS: tuple[str, ...] = ("wsm", "megatron-lm")
DEFAULT_CONVENTION = "wsm"
#: How a shape is turned into one weight per interval of an uneven window: its value at the
#: interval's start (``start``, the default discretisation) or its mean over the interval.
SAMPLINGS: tuple[str, ...] = ("start", "mean")
#: How to accept negative coefficients, named for both callers: the command-line tools and the
#: Python API (one message, so no tool has to rewrite the library's text).
_ALLOW_NEGATIVE_HINT = (
    "pass --allow-negative, or allow_negative=True in Python, to extrapolate anyway"
)
#: Relative tolerance under which checkpoint gaps count as equal (:func:`is_evenly_spaced`).
EVEN_SPACING_RTOL = 1e-9


# --------------------------------------------------------------------------- helpers


# Bad types raise ValueError too (ruff TRY004 silenced on purpose): callers such as the CLI
# and the merge tool catch one exception type for any bad schedule input.


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float or raise a ValueError naming ``name``."""
    # bool is an Integral; True as a ratio is almost certainly a caller bug.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")  # noqa: TRY004
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(  # noqa: TRY004
            f"k (number of merged intervals) must be an integer >= 1, got {k!r}"
        )
    if k < 1:
        raise ValueError(f"k (number of merged intervals) must be >= 1, got {k}")
    return int(k)


def _as_floats(values: Iterable[object], what: str) -> list[float]:
    """Convert a sequence to floats, rejecting strings, non-numbers, NaN and infinities."""
    if isinstance(values, (str, bytes)):
        # A string is iterable; refuse it here so "0.5,0.5" is not read char by char.
        raise ValueError(  # noqa: TRY004
            f"{what} must be a sequence of numbers, got a string; use load_custom()"
        )
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of numbers, got {values!r}") from None
    out = []
    for idx, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"{what}[{idx}] is not a real number: {v!r}")  # noqa: TRY004
        fv = float(v)
        if math.isnan(fv):
            raise ValueError(f"{what}[{idx}] is NaN")
        if math.isinf(fv):
            raise ValueError(f"{what}[{idx}] is infinite ({fv})")
        out.append(fv)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def _fmt(x: float) -> str:
    return f"{x:.12g}"


# --------------------------------------------------------------------------- shapes


def _shape_fn(method: str, final_ratio: float, xp: Any = math) -> Callable[[Any], Any]:
    # ``xp`` supplies sqrt/cos/pi: ``math`` for floats, ``numpy`` for whole arrays at once.
    rho = final_ratio
    if method == "linear":
        return lambda t: 1.0 - t
    if method == "cosine":
        return lambda t: 0.5 * (1.0 + xp.cos(xp.pi * t))
    if method == "1-sqrt":
        return lambda t: 1.0 - xp.sqrt(t)
    if method == "inverse-sqrt":
        # 1/sqrt(1 + t/tau) is the tail of an inverse-sqrt schedule with timescale tau (as a
        # fraction of the window); tau is chosen so that f(1) = rho.
        scale = rho**-2 - 1.0
        return lambda t: 1.0 / xp.sqrt(1.0 + scale * t)
    if method == "exponential":
        return lambda t: rho**t
    if method == "wsd-exponential":
        # Megatron-LM's --lr-wsd-decay-style exponential: 2 * 0.5^t - 1 (reaches 0 at t = 1).
        return lambda t: 2.0 * 0.5**t - 1.0
    if method == "constant":
        return lambda t: 1.0 + 0.0 * t  # an array of ones for an array t
    raise AssertionError(method)  # callers validate first


def _shape_integral(method: str, final_ratio: float) -> Callable[[float], float]:
    """An antiderivative F of the shape f (any constant), for interval means of f."""
    rho = final_ratio
    if method == "linear":
        return lambda t: t - 0.5 * t * t
    if method == "cosine":
        return lambda t: 0.5 * (t + math.sin(math.pi * t) / math.pi)
    if method == "1-sqrt":
        return lambda t: t - (2.0 / 3.0) * t * math.sqrt(t)
    if method == "inverse-sqrt":
        scale = rho**-2 - 1.0
        if scale == 0.0:  # rho = 1: f = 1
            return lambda t: t
        return lambda t: 2.0 * math.sqrt(1.0 + scale * t) / scale
    if method == "exponential":
        if rho == 1.0:
            return lambda t: t
        log_rho = math.log(rho)
        return lambda t: rho**t / log_rho
    if method == "wsd-exponential":
        return lambda t: 2.0 * 0.5**t / math.log(0.5) - t
    if method == "constant":
        return lambda t: t
    raise AssertionError(method)  # callers validate first


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def _check_convention(convention: object) -> str:
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise ValueError(
            f"unknown convention {convention!r}; choose one of: {', '.join(CONVENTIONS)}"
        )
    return convention


def _check_sampling(sampling: object) -> str:
    if not isinstance(sampling, str) or sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of: {', '.join(SAMPLINGS)}")
    return sampling


def _check_min_lr_ratio(min_lr_ratio: object) -> float:
    r = _check_real("min_lr_ratio", min_lr_ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {r}")
    return r


def _resolve_final_ratio(method: str, final_ratio: object) -> float:
    if final_ratio is None:
        return DEFAULT_FINAL_RATIO.get(method, 1.0)
    if method not in _FINAL_RATIO_METHODS:
        raise ValueError(
            f"final_ratio only applies to {' and '.join(_FINAL_RATIO_METHODS)}, not {method!r}"
        )
    rho = _check_real("final_ratio", final_ratio)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"final_ratio must be in (0, 1], got {rho}")
    return rho


def _resolve_alpha(method: str, alpha: object) -> float:
    if alpha is None:
        return DEFAULT_EMA_ALPHA
    if method != "ema":
        raise ValueError(f"alpha only applies to ema, not {method!r}")
    a = _check_real("alpha", alpha)
    if not 0.0 < a <= 1.0:
        raise ValueError(f"ema alpha must be in (0, 1], got {a}")
    return a


def decay_shape(
    method: str,
    t: float,
    *,
    min_lr_ratio: float = 0.0,
    final_ratio: float | None = None,
) -> float:
    """Evaluate the decay shape of a shape method at window fraction t ∈ [0, 1].

    Shapes (f(0) = 1 for all of them; rho = ``final_ratio`` ∈ (0, 1], defaults in
    :data:`DEFAULT_FINAL_RATIO`: 0.1 for exponential, 1/3 for inverse-sqrt):

    - ``linear``:          f(t) = 1 - t
    - ``cosine``:          f(t) = (1 + cos(π t)) / 2
    - ``1-sqrt``:          f(t) = 1 - √t  (Megatron ``minus_sqrt``; best in the WSM paper)
    - ``inverse-sqrt``:    f(t) = 1 / √(1 + (rho⁻² - 1) t), the tail of an η/√step schedule,
      scaled so that f(1) = rho
    - ``exponential``:     f(t) = rho^t, so f(1) = rho
    - ``wsd-exponential``: f(t) = 2·0.5^t - 1, Megatron-LM's ``--lr-wsd-decay-style
      exponential`` (reaches 0 at t = 1, unlike ``exponential``)
    - ``constant``:        f(t) = 1

    The floor r = ``min_lr_ratio`` returns r + (1 - r)·f(t). ``mean``, ``ema`` and
    ``custom`` are defined by coefficients, not by a shape, and are rejected here.
    """
    method = _check_method(method)
    if method not in SHAPE_METHODS:
        raise ValueError(f"{method!r} is defined by its coefficients, not by a decay shape")
    tt = _check_real("t", t)
    if not 0.0 <= tt <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {tt}")
    r = _check_min_lr_ratio(min_lr_ratio)
    f = _shape_fn(method, _resolve_final_ratio(method, final_ratio))
    return _apply_floor(min(1.0, max(0.0, f(tt))), r)


def _apply_floor(f: float, r: float) -> float:
    if r == 0.0:
        return f
    # 1 - (1-r)(1-f) rather than r + (1-r) f: exact 1 at f = 1, so w_1 = 1 and c_0 = 0 stay exact.
    return 1.0 - (1.0 - r) * (1.0 - f)


# --------------------------------------------------------------------------- the two maps


def validate_coefficients(
    c: Iterable[float], *, tol: float = DEFAULT_TOL, allow_negative: bool = False
) -> list[float]:
    """Check merge coefficients c_0 … c_k (oldest first) and return them as floats.

    Raises ``ValueError`` when there are fewer than 2 (k < 1), any is NaN/infinite or not a
    number, they do not sum to 1 within ``tol``, or (unless ``allow_negative``) any is below
    -``tol``. Negative coefficients mean the emulated decay rises somewhere or leaves
    [0, 1]; with ``allow_negative=True`` the merge is an extrapolation outside the convex
    hull of the checkpoints.
    """
    tol = _check_real("tol", tol)
    cs = _as_floats(c, "coefficients")
    if len(cs) < 2:
        raise ValueError(f"need at least 2 coefficients (c_0 … c_k with k >= 1), got {len(cs)}")
    total = math.fsum(cs)
    if abs(total - 1.0) > tol:
        raise ValueError(
            f"coefficients must sum to 1 (tolerance {tol:g}), got {_fmt(total)}; "
            "divide them by their sum to normalise"
        )
    if not allow_negative:
        for j, cj in enumerate(cs):
            if cj < -tol:
                raise ValueError(
                    f"coefficient c_{j} = {_fmt(cj)} is negative: the decay it emulates rises "
                    f"or leaves [0, 1] ({_ALLOW_NEGATIVE_HINT})"
                )
    return cs


def coefficients_from_decay(
    w: Iterable[float], *, allow_negative: bool = False, tol: float = DEFAULT_TOL
) -> list[float]:
    """Merge coefficients c_0 … c_k for decay weights w_1 … w_k (Theorem 3.1).

    c_k = w_k,  c_j = w_j - w_{j+1} (1 ≤ j < k),  c_0 = 1 - w_1; they sum to 1 by
    construction. A valid decay lies in [0, 1] and is non-increasing, which is exactly
    when every c_j ≥ 0; otherwise a ``ValueError`` names the offending weight, unless
    ``allow_negative=True`` (then any finite w is accepted).
    """
    ws = _as_floats(w, "decay weights")
    tol = _check_real("tol", tol)
    if not allow_negative:
        for i, wi in enumerate(ws, start=1):
            if not -tol <= wi <= 1.0 + tol:
                raise ValueError(
                    f"decay weight w_{i} = {_fmt(wi)} is outside [0, 1] ({_ALLOW_NEGATIVE_HINT})"
                )
    c = [1.0 - ws[0]]
    c.extend(ws[j] - ws[j + 1] for j in range(len(ws) - 1))
    c.append(ws[-1])
    if not allow_negative:
        for j in range(1, len(ws)):
            if c[j] < -tol:
                raise ValueError(
                    f"decay rises from w_{j} = {_fmt(ws[j - 1])} to w_{j + 1} = {_fmt(ws[j])}, "
                    f"giving a negative coefficient c_{j} = {_fmt(c[j])}; a decay must be "
                    f"non-increasing ({_ALLOW_NEGATIVE_HINT})"
                )
    return c


def decay_from_coefficients(
    c: Iterable[float], *, allow_negative: bool = False, tol: float = DEFAULT_TOL
) -> list[float]:
    """The decay w_1 … w_k that merge coefficients c_0 … c_k emulate: w_i = Σ_{j≥i} c_j.

    The coefficients are validated first (:func:`validate_coefficients`), so any merge
    weights can be shown as the schedule they stand for or rejected with a clear message.
    """
    cs = validate_coefficients(c, tol=tol, allow_negative=allow_negative)
    w = [0.0] * (len(cs) - 1)
    acc = 0.0
    # Suffix sums from the newest end: w_k = c_k exactly, the rest accumulate from there.
    for j in range(len(cs) - 1, 0, -1):
        acc += cs[j]
        w[j - 1] = acc
    if not allow_negative:
        # Valid coefficients give w in [0, 1] exactly; only rounding (e.g. nine 1/9s summing
        # to 1 + 2e-16) can step outside, so clamp it back. Clamping keeps w non-increasing.
        w = [min(1.0, max(0.0, wi)) for wi in w]
    return w


# --------------------------------------------------------------------------- methods


def _direct_coefficients(method: str, k: int, alpha: float, convention: str) -> list[float]:
    if method == "mean":
        if convention == "megatron-lm":
            # Every input equally: the linear decay of this convention (c_j = 1/(k+1)).
            return [1.0 / (k + 1)] * (k + 1)
        return [0.0] + [1.0 / k] * k
    # ema: the EMA θ̄ ← (1-alpha) θ̄ + alpha θ over θ_{n+1} … θ_{n+k}, started at θ̄ = θ_n.
    keep = 1.0 - alpha
    return [keep**k] + [alpha * keep ** (k - j) for j in range(1, k + 1)]


def _resolve(
    method: object,
    k: object,
    *,
    min_lr_ratio: object,
    alpha: object,
    final_ratio: object,
    coefficients: object,
    decay: object,
    allow_negative: bool,
    convention: object = DEFAULT_CONVENTION,
) -> tuple[list[float], list[float]]:
    """Shared body of :func:`decay_weights` and :func:`merge_coefficients`: returns (w, c)."""
    method = _check_method(method)
    convention = _check_convention(convention)
    r = _check_min_lr_ratio(min_lr_ratio)
    if method != "ema" and alpha is not None:
        raise ValueError(f"alpha only applies to ema, not {method!r}")
    if method not in _FINAL_RATIO_METHODS and final_ratio is not None:
        raise ValueError(
            f"final_ratio only applies to {' and '.join(_FINAL_RATIO_METHODS)}, not {method!r}"
        )

    if method == "custom":
        return _resolve_custom(k, r, coefficients, decay, allow_negative)
    if coefficients is not None or decay is not None:
        raise ValueError(
            f"coefficients/decay are only accepted with method 'custom', not {method!r}"
        )

    kk = _check_k(k)
    if method in DIRECT_METHODS:
        c = _direct_coefficients(method, kk, _resolve_alpha(method, alpha), convention)
        if r:
            # Floor in coefficient space: mix in r of the newest checkpoint (w -> r + (1-r) w).
            c = [(1.0 - r) * cj for cj in c]
            c[-1] += r
        c = validate_coefficients(c)
        return decay_from_coefficients(c), c

    f = _shape_fn(method, _resolve_final_ratio(method, final_ratio))
    # wsm: interval i sampled at its start, (i-1)/k. megatron-lm: i/(k+1), the same float
    # expression as Megatron-LM's ``index / n_checkpoints`` so its weights come out equal.
    if convention == "megatron-lm":
        ts = [i / (kk + 1) for i in range(1, kk + 1)]
    else:
        ts = [(i - 1) / kk for i in range(1, kk + 1)]
    # Clamp: cos/pow may land a rounding error outside [0, 1] near the ends.
    w = [_apply_floor(min(1.0, max(0.0, f(t))), r) for t in ts]
    return w, coefficients_from_decay(w)


def _resolve_custom(
    k: object, r: float, coefficients: object, decay: object, allow_negative: bool
) -> tuple[list[float], list[float]]:
    if (coefficients is None) == (decay is None):
        raise ValueError("method 'custom' needs exactly one of coefficients= or decay=")
    if r:
        raise ValueError(
            "min_lr_ratio does not apply to method 'custom'; fold the floor into the weights"
        )
    if coefficients is not None:
        c = validate_coefficients(load_custom(coefficients), allow_negative=allow_negative)
        w = decay_from_coefficients(c, allow_negative=allow_negative)
    else:
        w = load_custom(decay)
        c = coefficients_from_decay(w, allow_negative=allow_negative)
        validate_coefficients(c, allow_negative=allow_negative)
    if k is not None and _check_k(k) != len(w):
        what = f"{len(c)} coefficients" if coefficients is not None else f"{len(w)} decay weights"
        raise ValueError(f"k = {k} does not match the custom weights: {what} mean k = {len(w)}")
    return w, c


def decay_weights(
    method: str,
    k: int | None,
    *,
    min_lr_ratio: float = 0.0,
    alpha: float | None = None,
    final_ratio: float | None = None,
    coefficients: Iterable[float] | str | os.PathLike[str] | None = None,
    decay: Iterable[float] | str | os.PathLike[str] | None = None,
    allow_negative: bool = False,
    convention: str = DEFAULT_CONVENTION,
) -> list[float]:
    """Decay weights w_1 … w_k (LR scale of each interval) of a method.

    Shape methods (see :func:`decay_shape` for every f): w_i = f((i - 1)/k), so w_1 = 1.

    - ``mean``:  the decay implied by c_0 = 0, c_j = 1/k, i.e. w_i = (k - i + 1)/k — the
      same as ``linear``.
    - ``ema``:   the decay implied by the EMA coefficients (see :func:`merge_coefficients`),
      w_i = 1 - (1 - alpha)^{k-i+1}; ``alpha`` in (0, 1], default :data:`DEFAULT_EMA_ALPHA`.
    - ``custom``: ``decay`` as given (validated), or the decay implied by ``coefficients``;
      each may be a sequence, a comma list string or a file (:func:`load_custom`). ``k``
      may be None (taken from the list) or must match it.

    ``min_lr_ratio`` r ∈ [0, 1] floors every named method: w ↦ r + (1 - r)·w.
    ``final_ratio`` rho ∈ (0, 1] (defaults :data:`DEFAULT_FINAL_RATIO`) is f(1) of
    ``exponential`` and ``inverse-sqrt``. A parameter that does not apply to the method,
    or any invalid value, raises ``ValueError``.

    ``convention`` (:data:`CONVENTIONS`): ``"wsm"`` as above; ``"megatron-lm"`` samples
    shapes at w_i = f(i/(k+1)) (w_1 < 1, every checkpoint weighted) and makes ``mean`` the
    plain mean of all k+1 checkpoints (w_i = (k + 1 - i)/(k + 1)). ``ema`` and ``custom``
    are the same under both.
    """
    w, _ = _resolve(
        method,
        k,
        min_lr_ratio=min_lr_ratio,
        alpha=alpha,
        final_ratio=final_ratio,
        coefficients=coefficients,
        decay=decay,
        allow_negative=allow_negative,
        convention=convention,
    )
    return w


def merge_coefficients(
    method: str,
    k: int | None,
    *,
    min_lr_ratio: float = 0.0,
    alpha: float | None = None,
    final_ratio: float | None = None,
    coefficients: Iterable[float] | str | os.PathLike[str] | None = None,
    decay: Iterable[float] | str | os.PathLike[str] | None = None,
    allow_negative: bool = False,
    convention: str = DEFAULT_CONVENTION,
) -> list[float]:
    """Merge coefficients c_0 … c_k (oldest checkpoint first) of a method; they sum to 1.

    Shape methods: :func:`coefficients_from_decay` of :func:`decay_weights`, so c_0 = 0.
    Direct methods:

    - ``mean``: c_0 = 0, c_j = 1/k (the plain mean of the newest k checkpoints).
    - ``ema`` with alpha: c_j = alpha (1 - alpha)^{k-j} for j ≥ 1, c_0 = (1 - alpha)^k —
      an exponential moving average over θ_{n+1} … θ_{n+k} started from θ_n; alpha = 1 is
      ``constant``.
    - ``constant``: c = (0, …, 0, 1), the newest checkpoint only.
    - ``custom``: ``coefficients`` as given (validated), or Theorem 3.1 of ``decay``.

    Parameters as in :func:`decay_weights`; the floor r maps c ↦ (1 - r)·c + r·e_k.
    With ``convention="megatron-lm"`` shapes use w_i = f(i/(k+1)) and ``mean`` is
    c_j = 1/(k+1): every input weighted, as Megatron-LM's ``weighted_merge.py``.
    """
    _, c = _resolve(
        method,
        k,
        min_lr_ratio=min_lr_ratio,
        alpha=alpha,
        final_ratio=final_ratio,
        coefficients=coefficients,
        decay=decay,
        allow_negative=allow_negative,
        convention=convention,
    )
    return c


# --------------------------------------------------------------------------- custom input


def _parse_numbers(text: str, source: str) -> list[float]:
    """Numbers separated by commas, whitespace or newlines; '#' starts a comment."""
    tokens: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        tokens.extend(tok for tok in line.replace(",", " ").split() if tok)
    if not tokens:
        raise ValueError(f"no numbers found in {source}")
    out = []
    for idx, tok in enumerate(tokens):
        try:
            out.append(float(tok))
        except ValueError:
            raise ValueError(f"{source}: item {idx} is not a number: {tok!r}") from None
    return out


def load_custom(path_or_list: Iterable[float] | str | os.PathLike[str]) -> list[float]:
    """Read custom coefficients or decay weights.

    Accepts a sequence of numbers, a string of numbers separated by commas (e.g.
    ``"0,0.25,0.25,0.5"``), or a path to a file holding either a JSON list of numbers or
    plain numbers separated by commas/whitespace, one per line allowed, ``#`` comments
    allowed. Returns floats; raises ``ValueError`` for a missing file, an empty list,
    anything that is not a number, NaN or infinity. Sums and ranges are checked later by
    :func:`validate_coefficients` / :func:`coefficients_from_decay`.
    """
    if isinstance(path_or_list, os.PathLike):
        return _load_file(Path(path_or_list))
    if isinstance(path_or_list, str):
        text = path_or_list.strip()
        if not text:
            raise ValueError("empty custom weights: give a comma list of numbers or a file")
        path = Path(text)
        # A bare number list never names a file, so try the file first only if one exists.
        if path.is_file():
            return _load_file(path)
        try:
            values = _parse_numbers(text, "custom weights")
        except ValueError:
            raise ValueError(
                f"custom weights {text!r} are neither an existing file nor a comma-separated "
                "list of numbers"
            ) from None
        return _as_floats(values, "custom weights")
    return _as_floats(path_or_list, "custom weights")


def _load_file(path: Path) -> list[float]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read custom weights from {str(path)!r}: {exc}") from None
    source = repr(str(path))
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        # Text starting with "[" that parses is a JSON list; nesting fails in _as_floats.
        return _as_floats(data, f"custom weights in {source}")
    return _as_floats(_parse_numbers(text, source), f"custom weights in {source}")


# --------------------------------------------------------------------------- the method value

#: Methods for which ``final_ratio`` applies (f(1) of the shape).
FINAL_RATIO_METHODS: tuple[str, ...] = _FINAL_RATIO_METHODS


def shape_function(
    method: str, final_ratio: float | None = None, *, xp: Any = math
) -> Callable[[Any], Any]:
    """The decay shape f of a shape method as a function of t ∈ [0, 1], unclamped, no floor.

    The one definition of every shape (:func:`decay_shape` evaluates it with checks, clamp
    and floor); other modules that need f itself — e.g. the numpy LR curves of
    :mod:`megatron_wsm.annealing` — take it from here. ``xp=numpy`` gives the same f over
    whole arrays (millions of steps per LR curve: a Python call per step is far too slow).
    """
    method = _check_method(method)
    if method not in SHAPE_METHODS:
        raise ValueError(f"{method!r} is defined by its coefficients, not by a decay shape")
    return _shape_fn(method, _resolve_final_ratio(method, final_ratio), xp)


# --------------------------------------------------------------------------- moved names

#: Names defined in :mod:`megatron_wsm.schedule_positions` and :mod:`megatron_wsm.merge_method`,
#: still importable from here. They are resolved on first use (PEP 562 ``__getattr__``): both
#: modules import this one, so importing them at the top or bottom of it would be circular
#: whenever one of them is imported first.
_MOVED: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            (
                "decay_weights_at",
                "describe_convention",
                "discretisation",
                "is_evenly_spaced",
                "merge_coefficients_at",
                "window_fractions",
                "_check_positions",
                "_describe_formula",
                "_resolve_at",
                "_uneven_shape_weights",
            ),
            "megatron_wsm.schedule_positions",
        ),
        **dict.fromkeys(
            ("DEFAULT_METHOD", "MergeMethod", "_WeightsAction", "_floats_or_none"),
            "megatron_wsm.merge_method",
        ),
    }
)


def __getattr__(name: str) -> Any:
    """A name defined in :mod:`.schedule_positions` or :mod:`.merge_method` (see ``_MOVED``)."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # the same names, statically, for type checkers and IDEs
    from megatron_wsm.merge_method import DEFAULT_METHOD as DEFAULT_METHOD
    from megatron_wsm.merge_method import MergeMethod as MergeMethod
    from megatron_wsm.schedule_positions import decay_weights_at as decay_weights_at
    from megatron_wsm.schedule_positions import describe_convention as describe_convention
    from megatron_wsm.schedule_positions import discretisation as discretisation
    from megatron_wsm.schedule_positions import is_evenly_spaced as is_evenly_spaced
    from megatron_wsm.schedule_positions import merge_coefficients_at as merge_coefficients_at
    from megatron_wsm.schedule_positions import window_fractions as window_fractions
