"""Decay weights for checkpoints at uneven positions, and what a convention means.

Pure Python on floats; depends on :mod:`.shapes` only (the shapes, the two maps and the
conventions live there; its docstring has the math). Checkpoints at positions p_0 < … < p_k
(iterations or consumed tokens) sit at window fractions t_j = (p_j - p_0)/(p_k - p_0); a shape
method weighs interval i by f(t_{i-1}) (``sampling="start"``) or the mean of f over it
(``"mean"``). :class:`~megatron_wsm.coefficients.method.MergeMethod` (and
``merge_coefficients_at``) uses these for a method at given positions. Import the public names
from :mod:`megatron_wsm.coefficients`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from numbers import Integral, Real

from megatron_wsm.coefficients.shapes import (
    DEFAULT_CONVENTION,
    DIRECT_METHODS,
    FORMULAS,
    SHAPE_METHODS,
    apply_floor,
    as_floats,
    check_convention,
    check_min_lr_ratio,
    check_real,
    check_sampling,
    shape_antiderivative,
    shape_function,
)

#: Relative tolerance under which checkpoint gaps count as equal (:func:`is_evenly_spaced`).
EVEN_SPACING_RTOL = 1e-9


def check_positions(positions: object) -> list[int | float]:
    """Checkpoint positions as numbers (ints kept exact), at least 2, strictly increasing."""
    if isinstance(positions, (str, bytes)):
        raise ValueError("positions must be a sequence of numbers, got a string")  # noqa: TRY004
    try:
        items = list(positions)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"positions must be a sequence of numbers, got {positions!r}") from None
    out: list[int | float] = []
    for idx, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"positions[{idx}] is not a real number: {v!r}")  # noqa: TRY004
        # Integral positions (iterations, token counts) stay Python ints so that offsets and
        # their ratios are computed exactly, whatever their size.
        num: int | float = int(v) if isinstance(v, Integral) else float(v)
        if isinstance(num, float) and not math.isfinite(num):
            raise ValueError(f"positions[{idx}] is not finite ({num})")
        out.append(num)
    if len(out) < 2:
        raise ValueError(f"need at least 2 checkpoint positions (k >= 1), got {len(out)}")
    for j in range(1, len(out)):
        if not out[j] > out[j - 1]:
            raise ValueError(
                f"checkpoint positions must increase strictly (oldest first): "
                f"positions[{j - 1}] = {out[j - 1]} >= positions[{j}] = {out[j]}"
            )
    return out


def is_evenly_spaced(positions: Iterable[float], *, rtol: float = EVEN_SPACING_RTOL) -> bool:
    """Whether checkpoint positions p_0 < … < p_k have equal gaps.

    Integer positions must match exactly; float gaps may differ by ``rtol`` (relative).
    Raises ``ValueError`` for fewer than 2 positions or positions that do not increase.
    """
    pos = check_positions(positions)
    rtol = check_real("rtol", rtol)
    gaps = [b - a for a, b in zip(pos, pos[1:], strict=False)]
    first = gaps[0]
    if all(isinstance(g, int) for g in gaps):
        return all(g == first for g in gaps)
    return all(math.isclose(g, first, rel_tol=rtol, abs_tol=0.0) for g in gaps)


def window_fractions(positions: Iterable[float]) -> list[float]:
    """t_j = (p_j - p_0)/(p_k - p_0): where each checkpoint sits in the window [0, 1].

    t_0 = 0 and t_k = 1 exactly. Integer positions give correctly rounded ratios, so an
    even window of integers gives exactly j/k.
    """
    pos = check_positions(positions)
    first, span = pos[0], pos[-1] - pos[0]
    return [(p - first) / span for p in pos]


def uneven_shape_weights(
    method: str,
    fractions: list[float],
    *,
    min_lr_ratio: float = 0.0,
    final_ratio: float | None = None,
    sampling: str = "start",
) -> list[float]:
    """Decay weights w_1 … w_k of a shape method for checkpoints at window ``fractions``.

    ``fractions`` are t_0 = 0 < … < t_k = 1 (:func:`window_fractions`); interval i weighs
    f(t_{i-1}) (``sampling="start"``) or the mean of f over [t_{i-1}, t_i] (``"mean"``),
    clamped to [0, 1] and floored by ``min_lr_ratio``. Evenly spaced integer positions give
    f((i-1)/k) bit for bit.
    """
    r = check_min_lr_ratio(min_lr_ratio)
    sampling = check_sampling(sampling)
    f = shape_function(method, final_ratio)
    if sampling == "start":
        raw = [f(t) for t in fractions[:-1]]
    else:
        big_f = shape_antiderivative(method, final_ratio)
        raw = []
        for a, b in zip(fractions, fractions[1:], strict=False):
            # Below ~1e-7 the difference F(b) - F(a) loses too many digits; the midpoint
            # value is then the mean to within the curvature over a tiny interval.
            raw.append(f(0.5 * (a + b)) if b - a < 1e-7 else (big_f(b) - big_f(a)) / (b - a))
        # Every shape is non-increasing, so are its exact interval means; F(b) - F(a) over a
        # short interval still carries ~1e-16 / (b - a) of rounding, which can tip a mean above
        # its predecessor and give a coefficient of -1e-11. Restore the exact order.
        raw = list(itertools.accumulate(raw, min))
    return [apply_floor(min(1.0, max(0.0, x)), r) for x in raw]


def discretisation(
    convention: str = DEFAULT_CONVENTION, *, uneven: bool = False, sampling: str = "start"
) -> str:
    """One-line formula of how a shape f becomes w_1 … w_k, for tables and provenance."""
    convention = check_convention(convention)
    sampling = check_sampling(sampling)
    if convention == "megatron-lm":
        if uneven or sampling != "start":
            raise ValueError("convention 'megatron-lm' is defined for evenly spaced checkpoints")
        return "w_i = f(i/(k+1)), i = 1..k (Megatron-LM weighted_merge.py; every input weighted)"
    if sampling == "mean":
        return "w_i = mean of f over [t_(i-1), t_i], t_j = (p_j - p_0)/(p_k - p_0)"
    if uneven:
        return "w_i = f(t_(i-1)), t_j = (p_j - p_0)/(p_k - p_0) (interval start)"
    return "w_i = f((i-1)/k), i = 1..k (the oldest checkpoint anchors the window)"


def _describe_formula(
    method: str | None, convention: str, uneven_shape: bool, even: bool | None, sampling: str
) -> str:
    if method in SHAPE_METHODS:
        return discretisation(
            convention, uneven=bool(uneven_shape and even is False), sampling=sampling
        )
    if method == "mean" and convention == "megatron-lm":
        return "c_j = 1/(k+1) (every input equally)"
    if method in DIRECT_METHODS:
        return FORMULAS[method]
    return "explicit weights (Theorem 3.1 only)"


def describe_convention(
    coefficients: Iterable[float],
    *,
    method: str | None = None,
    convention: str = DEFAULT_CONVENTION,
    positions: Iterable[float] | None = None,
    sampling: str = "start",
) -> dict[str, object]:
    """What a set of coefficients means, for ``--dry-run`` output and merge provenance.

    Returns a JSON-ready dict: ``convention``, ``sampling``, ``discretisation`` (formula),
    ``positions`` and ``evenly_spaced`` (None without positions), ``zero_weight_inputs``
    (indices j with c_j == 0: those checkpoints do not change the merge) and ``notes``
    (plain sentences explaining the zeros and what the positions did).
    """
    cs = as_floats(coefficients, "coefficients")
    convention = check_convention(convention)
    sampling = check_sampling(sampling)
    pos = None if positions is None else check_positions(positions)
    if pos is not None and len(pos) != len(cs):
        raise ValueError(f"{len(pos)} positions given for {len(cs)} coefficients")
    even = None if pos is None else is_evenly_spaced(pos)
    is_shape = method in SHAPE_METHODS
    uneven_shape = is_shape and (even is False or sampling == "mean")
    zeros = [j for j, cj in enumerate(cs) if cj == 0.0]
    notes: list[str] = []
    if zeros and zeros[0] == 0 and convention == "wsm" and (is_shape or method == "mean"):
        notes.append(
            "input 0 (the oldest) has weight 0: under convention 'wsm' the decay starts at "
            "the oldest checkpoint, which only marks where the window begins; convention "
            "'megatron-lm' gives every input weight"
        )
    others = [j for j in zeros if j != 0 or not notes]
    if others:
        notes.append(f"inputs {others} have weight 0 and do not change the merge")
    if pos is not None and even is False and not is_shape:
        notes.append(
            f"method {method!r} weights checkpoints by index: the uneven positions do not "
            "change its coefficients (a shape method such as 'linear' follows them)"
        )
    if method == "custom":
        notes.append("explicit weights: the convention does not change them")
    return {
        "convention": convention,
        "sampling": sampling,
        "discretisation": _describe_formula(method, convention, uneven_shape, even, sampling),
        "positions": pos,
        "evenly_spaced": even,
        "zero_weight_inputs": zeros,
        "notes": notes,
    }
