"""The fit's solvers (scipy underneath) against brute-force references.

``_bounded_wls`` must be the exact non-negative weighted least-squares optimum: checked against
enumerating every KKT candidate (each subset of coefficients pinned at 0, the rest solved
unconstrained; the best feasible candidate is the optimum of the convex problem).
``_nelder_mead`` must find box-constrained minima, inside the box and on its faces.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_wsm.annealing.fit import _bounded_wls, _nelder_mead


def kkt_enumeration(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """min Σ w (Xb - y)² s.t. b >= 0 by trying every free set (tiny column counts only)."""
    sw = np.sqrt(w)
    A, t = X * sw[:, None], y * sw
    best, best_obj = np.zeros(X.shape[1]), float(t @ t)
    for r in range(1, X.shape[1] + 1):
        for free in itertools.combinations(range(X.shape[1]), r):
            sol, *_ = np.linalg.lstsq(A[:, free], t, rcond=None)
            if np.min(sol) < 0:
                continue
            b = np.zeros(X.shape[1])
            b[list(free)] = sol
            obj = float(np.sum((A @ b - t) ** 2))
            if obj < best_obj:
                best, best_obj = b, obj
    return best


@pytest.mark.parametrize("seed", range(12))
def test_bounded_wls_is_the_exact_constrained_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    # Columns of very different scales, like (1, S1^-alpha, -S2), and targets that push some
    # coefficients against their bound (negative truth).
    X = (
        np.stack([np.ones(n), rng.random(n) * 1e3, -rng.random(n) * 1e-4], axis=1)
        / (1 + rng.random(n))[:, None]
    )
    truth = rng.normal(size=3) * np.array([1.0, 1e-3, 1e4])
    y = X @ truth + 0.01 * rng.standard_normal(n)
    w = rng.uniform(0.05, 1.0, n)
    got = _bounded_wls(X, y, w)
    ref = kkt_enumeration(X, y, w)
    assert np.all(got >= 0)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize(
    ("centre", "expect"),
    [
        ((0.3, 0.7), (0.3, 0.7)),  # interior minimum
        ((1.4, 0.2), (1.0, 0.2)),  # beyond a face: the constrained optimum is on it
        ((-0.5, -0.1), (0.0, 0.0)),  # beyond a corner
    ],
)
def test_nelder_mead_finds_box_constrained_minima(centre, expect) -> None:
    c = np.array(centre)

    def f(x: np.ndarray) -> float:
        assert np.all((x >= 0) & (x <= 1)), x  # never evaluated outside the box
        return float(np.sum((x - c) ** 2 * np.array([1.0, 30.0])))

    x, v = _nelder_mead(f, np.array([0.5, 0.5]), step=0.06)
    np.testing.assert_allclose(x, expect, atol=1e-4)
    assert v == pytest.approx(f(np.asarray(expect)), abs=1e-7)


def test_nelder_mead_in_one_dimension() -> None:
    x, _ = _nelder_mead(lambda x: float((x[0] - 0.123) ** 2), np.array([1.0]), step=0.06)
    assert x[0] == pytest.approx(0.123, abs=1e-4)
