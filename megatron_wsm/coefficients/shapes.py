"""Decay shapes and the two maps between decay weights and merge coefficients (the WSM math).

The bottom of :mod:`megatron_wsm.coefficients`: it imports none of its siblings. It holds the
method names and constants, the shapes f(t) (and their antiderivatives), the two maps between
decay weights and coefficients, and the input checks the sibling modules share. Uneven
windows and what a convention means are in :mod:`.positions`; a method name and its
parameters become coefficients in :mod:`.method` (``MergeMethod``). Import the public names
from :mod:`megatron_wsm.coefficients`.

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

Uneven windows (:mod:`.positions`; ``merge_coefficients_at``). With checkpoints at positions
p_0 < … < p_k (iterations or consumed tokens) the shape is evaluated at the real window
fractions t_j = (p_j - p_0)/(p_k - p_0): ``sampling="start"`` takes w_i = f(t_{i-1}) (the
default discretisation, exactly; evenly spaced positions take the index path above),
``sampling="mean"`` the average of f over [t_{i-1}, t_i].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from types import MappingProxyType
from typing import Any

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
    *(m for m in SHAPE_METHODS if m != "constant"),
    *DIRECT_METHODS,
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

#: Methods for which ``final_ratio`` applies (f(1) of the shape).
FINAL_RATIO_METHODS: tuple[str, ...] = ("exponential", "inverse-sqrt")

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


# --------------------------------------------------------------------------- input checks
# Shared by the sibling modules (positions, method), so every message is written once.
# Bad types raise ValueError too (ruff TRY004 silenced on purpose): callers such as the CLI
# and the merge tool catch one exception type for any bad schedule input.


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float or raise a ValueError naming ``name``."""
    # bool is an Integral; True as a ratio is almost certainly a caller bug.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")  # noqa: TRY004
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def check_k(k: object) -> int:
    """Return ``k`` (the number of merged intervals) as an int >= 1 or raise a ValueError."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(  # noqa: TRY004
            f"k (number of merged intervals) must be an integer >= 1, got {k!r}"
        )
    if k < 1:
        raise ValueError(f"k (number of merged intervals) must be >= 1, got {k}")
    return int(k)


def as_floats(values: Iterable[object], what: str) -> list[float]:
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


def _check_choice(kind: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
    return value


def check_method(method: object) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise a ValueError listing them."""
    return _check_choice("method", method, METHODS)


def check_convention(convention: object) -> str:
    """Return ``convention`` if it is one of :data:`CONVENTIONS`, else raise a ValueError."""
    return _check_choice("convention", convention, CONVENTIONS)


def check_sampling(sampling: object) -> str:
    """Return ``sampling`` if it is one of :data:`SAMPLINGS`, else raise a ValueError."""
    return _check_choice("sampling", sampling, SAMPLINGS)


def check_min_lr_ratio(min_lr_ratio: object) -> float:
    """Return the LR floor r as a float in [0, 1] or raise a ValueError."""
    r = check_real("min_lr_ratio", min_lr_ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {r}")
    return r


def resolve_final_ratio(method: str, final_ratio: object) -> float:
    """rho = f(1) of ``method``: its default for None, else the checked value.

    A value given for a method outside :data:`FINAL_RATIO_METHODS` raises a ValueError.
    """
    if final_ratio is None:
        return DEFAULT_FINAL_RATIO.get(method, 1.0)
    if method not in FINAL_RATIO_METHODS:
        raise ValueError(
            f"final_ratio only applies to {' and '.join(FINAL_RATIO_METHODS)}, not {method!r}"
        )
    rho = check_real("final_ratio", final_ratio)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"final_ratio must be in (0, 1], got {rho}")
    return rho


def resolve_alpha(method: str, alpha: object) -> float:
    """The ema alpha: :data:`DEFAULT_EMA_ALPHA` for None, else the checked value (ema only)."""
    if alpha is None:
        return DEFAULT_EMA_ALPHA
    if method != "ema":
        raise ValueError(f"alpha only applies to ema, not {method!r}")
    a = check_real("alpha", alpha)
    if not 0.0 < a <= 1.0:
        raise ValueError(f"ema alpha must be in (0, 1], got {a}")
    return a


def _check_shape_method(method: object) -> str:
    method = check_method(method)
    if method not in SHAPE_METHODS:
        raise ValueError(f"{method!r} is defined by its coefficients, not by a decay shape")
    return method


def _fmt(x: float) -> str:
    return f"{x:.12g}"


# --------------------------------------------------------------------------- shapes


def _shape(method: str, final_ratio: float, xp: Any = math) -> tuple[Callable, Callable]:
    """The shape f of ``method`` and an antiderivative F of it (any constant), side by side so
    that a new shape brings both. ``xp`` supplies sqrt/cos/pi to f: ``math`` for floats,
    ``numpy`` for whole arrays at once; F (interval means of f) is only used on floats."""
    rho = final_ratio
    if method == "linear":
        return (lambda t: 1.0 - t), (lambda t: t - 0.5 * t * t)
    if method == "cosine":
        return (
            lambda t: 0.5 * (1.0 + xp.cos(xp.pi * t)),
            lambda t: 0.5 * (t + math.sin(math.pi * t) / math.pi),
        )
    if method == "1-sqrt":
        return (lambda t: 1.0 - xp.sqrt(t)), (lambda t: t - (2.0 / 3.0) * t * math.sqrt(t))
    if method == "inverse-sqrt":
        # 1/sqrt(1 + t/tau) is the tail of an inverse-sqrt schedule with timescale tau (as a
        # fraction of the window); tau is chosen so that f(1) = rho.
        scale = rho**-2 - 1.0
        if scale == 0.0:  # rho = 1: f = 1
            return (lambda t: 1.0 / xp.sqrt(1.0 + scale * t)), (lambda t: t)
        return (
            lambda t: 1.0 / xp.sqrt(1.0 + scale * t),
            lambda t: 2.0 * math.sqrt(1.0 + scale * t) / scale,
        )
    if method == "exponential":
        if rho == 1.0:
            return (lambda t: rho**t), (lambda t: t)
        log_rho = math.log(rho)
        return (lambda t: rho**t), (lambda t: rho**t / log_rho)
    if method == "wsd-exponential":
        # Megatron-LM's --lr-wsd-decay-style exponential: 2 * 0.5^t - 1 (reaches 0 at t = 1).
        return (lambda t: 2.0 * 0.5**t - 1.0), (lambda t: 2.0 * 0.5**t / math.log(0.5) - t)
    if method == "constant":
        # 1 + 0 t: an array of ones for an array t.
        return (lambda t: 1.0 + 0.0 * t), (lambda t: t)
    raise AssertionError(method)  # callers validate first


def apply_floor(f: float, r: float) -> float:
    """The decay value f under the LR floor r: r + (1 - r)·f."""
    if r == 0.0:
        return f
    # 1 - (1-r)(1-f) rather than r + (1-r) f: exact 1 at f = 1, so w_1 = 1 and c_0 = 0 stay exact.
    return 1.0 - (1.0 - r) * (1.0 - f)


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
    method = _check_shape_method(method)
    tt = check_real("t", t)
    if not 0.0 <= tt <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {tt}")
    r = check_min_lr_ratio(min_lr_ratio)
    f, _ = _shape(method, resolve_final_ratio(method, final_ratio))
    return apply_floor(min(1.0, max(0.0, f(tt))), r)


def shape_function(
    method: str, final_ratio: float | None = None, *, xp: Any = math
) -> Callable[[Any], Any]:
    """The decay shape f of a shape method as a function of t ∈ [0, 1], unclamped, no floor.

    The one definition of every shape (:func:`decay_shape` evaluates it with checks, clamp
    and floor); other modules that need f itself — e.g. the numpy LR curves of
    :mod:`megatron_wsm.annealing` — take it from here. ``xp=numpy`` gives the same f over
    whole arrays (millions of steps per LR curve: a Python call per step is far too slow).
    """
    method = _check_shape_method(method)
    return _shape(method, resolve_final_ratio(method, final_ratio), xp)[0]


def shape_antiderivative(method: str, final_ratio: float | None = None) -> Callable[[float], float]:
    """An antiderivative F of the shape f of :func:`shape_function` (up to a constant).

    (F(b) - F(a)) / (b - a) is the mean of f over [a, b]: the ``sampling="mean"`` weight of
    an interval (:mod:`.positions`).
    """
    method = _check_shape_method(method)
    return _shape(method, resolve_final_ratio(method, final_ratio))[1]


# --------------------------------------------------------------------------- the two maps


def _refuse_negative(
    c: list[float], tol: float, indices: Iterable[int], why: Callable[[int], str]
) -> None:
    """Raise a ValueError, ``why(j)`` plus how to allow it, at the first j of ``indices`` with
    c[j] < -tol: the one negativity check of both maps."""
    j = next((j for j in indices if c[j] < -tol), None)
    if j is not None:
        raise ValueError(f"{why(j)} ({_ALLOW_NEGATIVE_HINT})")


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
    tol = check_real("tol", tol)
    cs = as_floats(c, "coefficients")
    if len(cs) < 2:
        raise ValueError(f"need at least 2 coefficients (c_0 … c_k with k >= 1), got {len(cs)}")
    total = math.fsum(cs)
    if abs(total - 1.0) > tol:
        raise ValueError(
            f"coefficients must sum to 1 (tolerance {tol:g}), got {_fmt(total)}; "
            "divide them by their sum to normalise"
        )

    def negative(j: int) -> str:
        return (
            f"coefficient c_{j} = {_fmt(cs[j])} is negative: the decay it emulates "
            "rises or leaves [0, 1]"
        )

    if not allow_negative:
        _refuse_negative(cs, tol, range(len(cs)), negative)
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
    ws = as_floats(w, "decay weights")
    tol = check_real("tol", tol)
    if not allow_negative:
        for i, wi in enumerate(ws, start=1):
            if not -tol <= wi <= 1.0 + tol:
                raise ValueError(
                    f"decay weight w_{i} = {_fmt(wi)} is outside [0, 1] ({_ALLOW_NEGATIVE_HINT})"
                )
    c = [1.0 - ws[0]]
    c.extend(ws[j] - ws[j + 1] for j in range(len(ws) - 1))
    c.append(ws[-1])
    # With every w_i in [0, 1], c_0 and c_k are non-negative; only a rise between two weights
    # can make one of c_1 … c_{k-1} negative, and the message names that rise.

    def rise(j: int) -> str:
        return (
            f"decay rises from w_{j} = {_fmt(ws[j - 1])} to w_{j + 1} = "
            f"{_fmt(ws[j])}, giving a negative coefficient c_{j} = {_fmt(c[j])}; a decay must "
            "be non-increasing"
        )

    if not allow_negative:
        _refuse_negative(c, tol, range(1, len(ws)), rise)
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
