"""Merge coefficients for checkpoints at their real positions (uneven merge windows)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_wsm import coefficients
from megatron_wsm.coefficients import (
    DIRECT_METHODS,
    METHODS,
    SHAPE_METHODS,
    decay_from_coefficients,
    decay_shape,
    decay_weights,
    decay_weights_at,
    describe_convention,
    is_evenly_spaced,
    merge_coefficients,
    merge_coefficients_at,
    window_fractions,
)
from megatron_wsm.coefficients.positions import uneven_shape_weights

NAMED = tuple(m for m in METHODS if m != "custom")
PROPS = settings(max_examples=150, deadline=None)
# Spacings: one step, a save interval, a token count per save (beyond 2^32), a float.
SPACINGS = (1, 250, 3 * 2**33, 0.5)


# --------------------------------------------------------------------------- even spacing


@pytest.mark.parametrize("method", NAMED)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.3])
def test_even_positions_equal_index_coefficients(method: str, min_lr_ratio: float) -> None:
    for k, spacing in itertools.product(range(1, 17), SPACINGS):
        start = 7 * spacing
        positions = [start + j * spacing for j in range(k + 1)]
        kw = {"min_lr_ratio": min_lr_ratio}
        # Bit-identical, not approximately equal: saved provenance compares numbers.
        assert merge_coefficients_at(method, positions, **kw) == merge_coefficients(method, k, **kw)
        assert decay_weights_at(method, positions, **kw) == decay_weights(method, k, **kw)


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_position_formula_itself_reduces_bit_exactly(method: str) -> None:
    """The position formula, not just the even shortcut, gives f((i-1)/k) bit for bit.

    Integer offsets divided exactly (Python int / int is correctly rounded) are the same
    rational as (i-1)/k, so they round to the same float.
    """
    for k, spacing in itertools.product(range(1, 17), (1, 250, 3 * 2**33)):
        positions = [10**6 + j * spacing for j in range(k + 1)]
        got = uneven_shape_weights(method, window_fractions(positions), sampling="start")
        assert got == decay_weights(method, k)


def test_is_evenly_spaced() -> None:
    assert is_evenly_spaced([0, 100, 200, 300])
    assert is_evenly_spaced([5, 7])
    assert not is_evenly_spaced([0, 100, 200, 301])
    assert is_evenly_spaced([0.0, 0.1, 0.2, 0.30000000000000004])
    assert not is_evenly_spaced([0.0, 0.1, 0.2, 0.31])
    assert not is_evenly_spaced([0.0, 0.1, 0.2, 0.3 + 1e-6])
    assert is_evenly_spaced([0.0, 0.1, 0.2, 0.3 + 1e-6], rtol=1e-4)


def test_window_fractions_ends_are_exact() -> None:
    t = window_fractions([1000, 1100, 1300, 1700])
    assert t == [0.0, 100 / 700, 300 / 700, 1.0]
    assert t[0] == 0.0 and t[-1] == 1.0


# --------------------------------------------------------------------------- by hand


def test_uneven_linear_by_hand() -> None:
    # Checkpoints at 0, 1, 3, 4: t = 0, 1/4, 3/4, 1; start sampling w = f(0), f(1/4), f(3/4).
    assert decay_weights_at("linear", [0, 1, 3, 4]) == [1.0, 0.75, 0.25]
    assert merge_coefficients_at("linear", [0, 1, 3, 4]) == [0.0, 0.25, 0.5, 0.25]
    # Mean sampling: w = means of 1 - t over [0, 1/4], [1/4, 3/4], [3/4, 1].
    w = decay_weights_at("linear", [0, 1, 3, 4], sampling="mean")
    assert w == pytest.approx([0.875, 0.5, 0.125], abs=1e-15)
    c = merge_coefficients_at("linear", [0, 1, 3, 4], sampling="mean")
    assert c == pytest.approx([0.125, 0.375, 0.375, 0.125], abs=1e-15)


def test_uneven_1_sqrt_by_hand_with_floor() -> None:
    # Saved at 0, 100, 400 (interval changed): t = 0, 1/4, 1; w = 1, 1 - sqrt(1/4) = 1/2.
    assert merge_coefficients_at("1-sqrt", [0, 100, 400]) == [0.0, 0.5, 0.5]
    # Floor r = 0.2: w = 1, 0.2 + 0.8 * 0.5 = 0.6.
    c = merge_coefficients_at("1-sqrt", [0, 100, 400], min_lr_ratio=0.2)
    assert c == pytest.approx([0.0, 0.4, 0.6], abs=1e-15)


# --------------------------------------------------------------------------- missing checkpoint


def _sgd_uneven(w: list[float], steps: list[int], *, dim: int, seed: int):
    """Plain SGD on fixed gradients: constant-LR checkpoints vs LR scaled by w_i per interval."""
    rng = np.random.default_rng(seed)
    lr = 0.05
    theta0 = rng.standard_normal(dim)
    grads = rng.standard_normal((sum(steps), dim))
    theta, theta_b, checkpoints, s = theta0.copy(), theta0.copy(), [theta0.copy()], 0
    for wi, n in zip(w, steps, strict=True):
        for _ in range(n):
            theta = theta - lr * grads[s]
            theta_b = theta_b - (lr * wi) * grads[s]
            s += 1
        checkpoints.append(theta.copy())
    return checkpoints, theta_b


@pytest.mark.parametrize("method", SHAPE_METHODS)
@pytest.mark.parametrize("missing", [1, 4, 7])
def test_missing_checkpoint_emulates_the_same_decay(method: str, missing: int) -> None:
    full = [1000 + 50 * j for j in range(9)]  # k = 8, saved every 50 iterations
    kept = full[:missing] + full[missing + 1 :]
    t_kept = [(p - full[0]) / (full[-1] - full[0]) for p in kept]
    # The decay emulated at the remaining checkpoints is the same shape f at their positions.
    w = decay_weights_at(method, kept)
    assert w == pytest.approx([decay_shape(method, t) for t in t_kept[:-1]], abs=1e-15)
    # ... and the merge reproduces SGD run with that per-interval LR, uneven intervals included.
    c = merge_coefficients_at(method, kept)
    gaps = [(b - a) // 50 for a, b in itertools.pairwise(kept)]
    checkpoints, theta_b = _sgd_uneven(w, gaps, dim=32, seed=missing)
    merged = sum(cj * th for cj, th in zip(c, checkpoints, strict=True))
    np.testing.assert_allclose(merged, theta_b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(decay_from_coefficients(c), w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", SHAPE_METHODS)
@pytest.mark.parametrize("missing", [1, 3, 6])
def test_mean_sampling_missing_checkpoint_is_its_interpolation(method: str, missing: int) -> None:
    """Mean sampling: dropping θ_m equals the full merge with θ_m replaced by its linear
    interpolation between its neighbours (by position) — the LR area is conserved."""
    full = [0, 30, 60, 100, 130, 200, 230, 260, 300]
    kept = full[:missing] + full[missing + 1 :]
    c_full = merge_coefficients_at(method, full, sampling="mean")
    c_kept = merge_coefficients_at(method, kept, sampling="mean")
    lo, mid, hi = full[missing - 1], full[missing], full[missing + 1]
    lam = (mid - lo) / (hi - lo)
    expected = c_full[:missing] + c_full[missing + 1 :]
    expected[missing - 1] += (1 - lam) * c_full[missing]
    expected[missing] += lam * c_full[missing]
    np.testing.assert_allclose(c_kept, expected, rtol=0, atol=1e-12)


_SHAPE_PARAMS = [(m, None) for m in SHAPE_METHODS] + [
    ("exponential", 0.25),
    ("exponential", 1.0),
    ("inverse-sqrt", 0.25),
    ("inverse-sqrt", 1.0),
]


@pytest.mark.parametrize(("method", "final_ratio"), _SHAPE_PARAMS)
@pytest.mark.parametrize("r", [0.0, 0.3])
def test_mean_sampling_matches_numerical_average(method, final_ratio, r) -> None:
    positions = [0, 1, 2, 5, 6, 10]
    t = window_fractions(positions)
    kw = {"min_lr_ratio": r, "final_ratio": final_ratio}
    w = decay_weights_at(method, positions, sampling="mean", **kw)
    for i, (a, b) in enumerate(itertools.pairwise(t)):
        # Midpoint rule with many points: an independent check of the antiderivatives.
        n = 2000
        xs = [a + (b - a) * (m + 0.5) / n for m in range(n)]
        avg = math.fsum(decay_shape(method, x, **kw) for x in xs) / n
        assert w[i] == pytest.approx(avg, abs=1e-5), (i, a, b)


# --------------------------------------------------------------------------- index methods


@pytest.mark.parametrize("method", DIRECT_METHODS)
def test_direct_methods_weight_by_index(method: str) -> None:
    positions = [0, 10, 15, 40, 41]
    assert merge_coefficients_at(method, positions) == merge_coefficients(method, 4)
    info = describe_convention(
        merge_coefficients_at(method, positions), method=method, positions=positions
    )
    assert info["evenly_spaced"] is False
    assert any("weights checkpoints by index" in n for n in info["notes"])


def test_custom_with_positions_checks_count() -> None:
    assert merge_coefficients_at("custom", [0, 1, 5], decay=[1.0, 0.5]) == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="k = 3 does not match"):
        merge_coefficients_at("custom", [0, 1, 5, 6], decay=[1.0, 0.5])


# --------------------------------------------------------------------------- properties

_positions = st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=30).map(
    lambda gaps: list(itertools.accumulate([0, *gaps]))
)


@PROPS
@given(
    method=st.sampled_from(SHAPE_METHODS),
    positions=_positions,
    sampling=st.sampled_from(coefficients.SAMPLINGS),
    r=st.floats(min_value=0.0, max_value=1.0),
)
def test_uneven_coefficients_are_valid(method, positions, sampling, r) -> None:
    c = merge_coefficients_at(method, positions, sampling=sampling, min_lr_ratio=r)
    w = decay_weights_at(method, positions, sampling=sampling, min_lr_ratio=r)
    assert len(c) == len(positions) and len(w) == len(positions) - 1
    assert abs(math.fsum(c) - 1.0) <= 1e-12
    # Monotone decays give a convex combination: no negative weight.
    assert min(c) >= (0.0 if sampling == "start" else -1e-12)
    assert all(0.0 <= wi <= 1.0 for wi in w)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(w))
    if sampling == "start":
        assert w[0] == 1.0 and c[0] == 0.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: merge_coefficients_at("linear", [0]), "at least 2 checkpoint positions"),
        (lambda: merge_coefficients_at("linear", []), "at least 2 checkpoint positions"),
        (lambda: merge_coefficients_at("linear", [0, 2, 2]), "increase strictly"),
        (lambda: merge_coefficients_at("linear", [3, 2, 1]), "increase strictly"),
        (lambda: merge_coefficients_at("linear", [0, math.nan]), "not finite"),
        (lambda: merge_coefficients_at("linear", [0, True]), "not a real number"),
        (lambda: merge_coefficients_at("linear", "0,1,2"), "got a string"),
        (lambda: merge_coefficients_at("linear", 3), "sequence of numbers"),
        (lambda: merge_coefficients_at("linear", [0, 1], sampling="end"), "unknown sampling"),
        (lambda: merge_coefficients_at("linear", [0, 1], convention="x"), "unknown convention"),
        (
            lambda: merge_coefficients_at("linear", [0, 1, 3], convention="megatron-lm"),
            "unevenly spaced checkpoints need convention 'wsm'",
        ),
        (
            lambda: merge_coefficients_at(
                "linear", [0, 1, 2], convention="megatron-lm", sampling="mean"
            ),
            "sampling 'mean' need convention 'wsm'",
        ),
        (lambda: merge_coefficients_at("linear", [0, 1, 3], alpha=0.5), "alpha only applies"),
        (lambda: is_evenly_spaced([1]), "at least 2"),
        (lambda: describe_convention([0.5, 0.5], positions=[0, 1, 2]), "3 positions given"),
    ],
)
def test_validation_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
