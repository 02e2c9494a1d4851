"""Fitting the law to runs: variable projection with a robust (Huber) inner solve.

For given nonlinear parameters (alpha, lam) the law is linear in (L0, A, C); those are solved
by iteratively reweighted least squares for the Huber loss on *relative* residuals, with
A, C, L0 >= 0 enforced exactly (a bounded linear least-squares solve). The outer
(alpha, log10(1 - lam)) is searched on a grid, and the best grid points start a bounded
Nelder-Mead each ("several starts"); the best result wins.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.optimize

from megatron_wsm.annealing.law import (
    LAW,
    IdentificationError,
    LawParams,
    _areas_at,
    peak_index,
    predict_loss,
)
from megatron_wsm.annealing.runs import (
    Run,
    default_fit_start,
    default_smooth_window,
    mape,
    smooth,
)

#: Huber threshold on relative residuals (pred/obs - 1): 0.5 % — above the noise of a
#: smoothed curve, below the misfit of a transient (loss spike, early-training curvature).
DEFAULT_HUBER_DELTA = 0.005
#: Bounds of the exponent α; loss-vs-area exponents reported are ~0.3-0.6.
DEFAULT_ALPHA_BOUNDS = (0.02, 2.0)
#: Bounds of the momentum factor λ (searched as log10(1 - λ)). The benefit of an LR drop
#: builds up over ~1/(1-λ) steps: λ → 1 keeps paying off long after the drop (what Tissue et
#: al. see on LLMs, λ ≈ 0.999); λ = 0.5 means the loss follows the LR within a couple of steps.
DEFAULT_LAM_BOUNDS = (0.5, 0.9999)
# Minimum relative LR drop (of the peak) that makes the annealing term identifiable.
_MIN_DROP = 0.05
# Minimum max/min ratio of S1 over the fitted points to pin the power law down.
_MIN_S1_RATIO = 2.0


@dataclasses.dataclass
class RunFit:
    """How well the law matches one run (fit or held out)."""

    name: str
    steps: np.ndarray  #: the evaluated iterations
    observed: np.ndarray  #: smoothed observed loss at those steps
    raw: np.ndarray  #: unsmoothed observed loss
    predicted: np.ndarray
    mape: float  #: percent, vs the smoothed loss
    mape_raw: float  #: percent, vs the raw loss
    rmse: float  #: loss units, vs the smoothed loss
    noise_mape: float  #: percent, smoothed vs raw loss: the floor of ``mape_raw``

    def to_json(self) -> dict[str, Any]:
        """Summary dict (no curves)."""
        return {
            "name": self.name,
            "mape": self.mape,
            "mape_raw": self.mape_raw,
            "noise_mape": self.noise_mape,
            "rmse": self.rmse,
            "n_points": int(self.steps.size),
            "first_step": int(self.steps[0]),
            "last_step": int(self.steps[-1]),
            "final_observed": float(self.observed[-1]),
            "final_predicted": float(self.predicted[-1]),
        }


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit_law`."""

    params: LawParams
    runs: list[RunFit]
    mape: float  #: percent over all fitted points (vs smoothed losses)
    rmse: float
    objective: float  #: mean Huber loss at the optimum
    huber_delta: float
    smooth_window: int
    fit_start: dict[str, int]
    lam_fixed: bool
    n_starts: int
    n_evals: int
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "law": LAW,
            "params": self.params.to_json(),
            "lam_fixed": self.lam_fixed,
            "fit_error": {"mape": self.mape, "rmse": self.rmse, "huber_objective": self.objective},
            "huber_delta": self.huber_delta,
            "smooth_window": self.smooth_window,
            "fit_start": self.fit_start,
            "n_starts": self.n_starts,
            "n_evals": self.n_evals,
            "runs": [r.to_json() for r in self.runs],
            "warnings": self.warnings,
        }


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _bounded_wls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_b Σ w (X b - y)² subject to b ≥ 0 (all columns), exactly.

    scipy's NNLS (an active-set method, exact for this convex problem) on the √w-scaled rows;
    columns are scaled to unit norm first for conditioning (S2 and S1^-α differ by decades).
    """
    sw = np.sqrt(w)
    A = X * sw[:, None]
    d = np.linalg.norm(A, axis=0)
    d[d == 0] = 1.0
    b, _ = scipy.optimize.nnls(A / d, y * sw)
    return b / d


class _Problem:
    """Fit data laid out once; evaluates the profiled Huber objective of (α, λ)."""

    def __init__(self, runs: list[tuple[Run, np.ndarray, np.ndarray]], delta: float) -> None:
        self.runs = runs  # (run, steps, smoothed loss) per fit run
        self.y = np.concatenate([obs for _, _, obs in runs])
        self.delta = delta
        self.n_evals = 0
        self._w: np.ndarray | None = None
        self._s1 = [_areas_at(run.lrs, steps, 0.5, run.loss_lag)[0] for run, steps, _ in runs]

    def features(self, alpha: float, lam: float) -> np.ndarray:
        cols = []
        for (run, steps, _), s1 in zip(self.runs, self._s1):
            _, s2 = _areas_at(run.lrs, steps, lam, run.loss_lag)
            cols.append(np.stack([np.ones_like(s1), s1**-alpha, -s2], axis=1))
        return np.concatenate(cols)

    def solve(self, alpha: float, lam: float) -> tuple[float, np.ndarray]:
        """Huber-IRLS for (L0, A, C) at fixed (α, λ); returns (mean Huber loss, coefs)."""
        self.n_evals += 1
        X = self.features(alpha, lam)
        # Relative residuals r = (X b - y) / y: divide rows by y, the target becomes 1.
        Xr = X / self.y[:, None]
        ones = np.ones_like(self.y)
        # Warm start from the previous evaluation's Huber weights: the optimiser moves in small
        # steps, so the set of down-weighted points rarely changes and IRLS converges in a few
        # iterations instead of a dozen. (IRLS converges to the same optimum from any start.)
        w = self._w if self._w is not None else np.ones_like(self.y)
        b = _bounded_wls(Xr, ones, w)
        for _ in range(50):
            r = Xr @ b - ones
            w = np.minimum(1.0, self.delta / np.maximum(np.abs(r), 1e-300))
            b_new = _bounded_wls(Xr, ones, w)
            done = np.max(np.abs(b_new - b)) <= 1e-8 * max(1e-30, np.max(np.abs(b_new)))
            b = b_new
            if done:
                break
        r = Xr @ b - ones
        self._w = w
        return float(np.mean(_huber(r, self.delta))), b


def _nelder_mead(
    f: Callable[[np.ndarray], float], x0: np.ndarray, step: float, iters: int = 200
) -> tuple[np.ndarray, float]:
    """Minimise ``f`` over the unit box [0, 1]^d from ``x0`` (scipy's bounded Nelder-Mead).

    The start simplex steps ``step`` from ``x0`` along each axis (inwards at the box's edge);
    converged when the simplex is smaller than 1e-5 in every coordinate, whatever the spread
    of ``f`` (``fatol`` = inf): the Huber objective is flat near its optimum.
    """
    d = x0.size
    simplex = [np.clip(x0, 0, 1)]
    for j in range(d):
        e = x0.copy()
        e[j] += step if x0[j] + step <= 1 else -step
        simplex.append(np.clip(e, 0, 1))
    res = scipy.optimize.minimize(
        f,
        x0,
        method="Nelder-Mead",
        bounds=[(0.0, 1.0)] * d,
        options={
            "initial_simplex": np.array(simplex),
            "xatol": 1e-5,
            "fatol": np.inf,
            "maxiter": iters,
        },
    )
    return np.asarray(res.x), float(res.fun)


def _smoothed_from(
    run: Run, start: int | None, smooth_window: int | None
) -> tuple[int, int, np.ndarray]:
    """``(first scored iteration, smoothing window, smoothed loss)`` of a run, with the
    defaults of :func:`fit_law`: :func:`default_fit_start` and :func:`default_smooth_window`."""
    first = start if start is not None else default_fit_start(run)
    # Need some LR area before the first fitted point (S1 > 0).
    first = max(first, 1 + run.loss_lag + (1 if run.lrs[0] == 0 else 0))
    window = (
        smooth_window
        if smooth_window is not None
        else default_smooth_window(int(run.steps[-1] - run.steps[0] + 1))
    )
    return first, window, smooth(run.steps, run.loss, window)


def fit_law(
    runs: Sequence[Run],
    *,
    lam: float | None = None,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    smooth_window: int | None = None,
    fit_start: int | None = None,
    alpha_bounds: tuple[float, float] = DEFAULT_ALPHA_BOUNDS,
    lam_bounds: tuple[float, float] = DEFAULT_LAM_BOUNDS,
    n_starts: int = 4,
    max_points: int = 2000,
) -> FitResult:
    """Fit the law to the observed losses of ``runs`` (robust, bounded, several starts).

    - ``lam``: fix λ (e.g. 0.999) instead of fitting it within ``lam_bounds``.
    - ``smooth_window``: window (steps) of the robust local linear smoothing applied to each
      run's loss before fitting (:func:`smooth`); default :func:`default_smooth_window` of the
      run (5 %); 1 = fit the raw losses.
    - ``fit_start``: first iteration fitted in every run; default :func:`default_fit_start`
      (after warmup and the first 10 % of the run: the law has no term for the fast
      early-training transient).
    - ``max_points``: observations per run are thinned evenly to at most this many.

    Raises :class:`IdentificationError` when the logs cannot pin the parameters down: no
    losses, too few points, no LR decay anywhere (the annealing term C·S2 is then
    unobservable), or too little LR area covered to identify the power law.
    """
    if not runs:
        raise IdentificationError("no runs to fit")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    data: list[tuple[Run, np.ndarray, np.ndarray]] = []
    raws: list[np.ndarray] = []
    starts: dict[str, int] = {}
    warn: list[str] = []
    windows = []
    max_drop = 0.0
    for run in runs:
        if not run.has_loss:
            raise IdentificationError(f"{run.name}: no loss values to fit")
        start, window, sm = _smoothed_from(run, fit_start, smooth_window)
        windows.append(window)
        keep = run.steps >= start
        steps, obs, raw = run.steps[keep], sm[keep], run.loss[keep]
        if steps.size > max_points:
            sel = np.unique(np.linspace(0, steps.size - 1, max_points).round().astype(int))
            steps, obs, raw = steps[sel], obs[sel], raw[sel]
        if steps.size == 0:
            raise IdentificationError(
                f"{run.name}: no loss values at or after iteration {start} (fit start)"
            )
        if np.any(obs <= 0):
            raise IdentificationError(f"{run.name}: losses must be positive")
        starts[run.name] = int(start)
        data.append((run, steps, obs))
        raws.append(raw)
        # The largest LR drop below the peak that the fitted losses have seen.
        pk = peak_index(run.lrs)
        seen = run.lrs[pk : int(steps[-1]) - run.loss_lag]
        peak = float(run.lrs[pk])
        if seen.size and peak > 0:
            max_drop = max(max_drop, (peak - float(seen.min())) / peak)
    n_total = sum(s.size for _, s, _ in data)
    n_params = 4 if lam is not None else 5
    if n_total < 3 * n_params:
        raise IdentificationError(
            f"only {n_total} loss values after the fit start; need at least {3 * n_params} "
            "to fit the law's parameters"
        )
    if max_drop < _MIN_DROP:
        raise IdentificationError(
            "the logs cannot identify the annealing term: no fitted run decays its learning "
            f"rate (largest drop below the peak: {100 * max_drop:.1f} %, need >= "
            f"{100 * _MIN_DROP:.0f} %). A constant LR only shows L0 + A*S1^-alpha; add a run "
            "with a decay (e.g. WSD --lr-wsd-decay-iters, cosine) to --fit"
        )
    s1_all = np.concatenate([_areas_at(r.lrs, s, 0.5, r.loss_lag)[0] for r, s, _ in data])
    if s1_all.min() <= 0 or s1_all.max() / s1_all.min() < _MIN_S1_RATIO:
        raise IdentificationError(
            "the logs cannot identify the power law in S1: the fitted steps cover LR areas "
            f"from {s1_all.min():.3g} to {s1_all.max():.3g} (need a ratio >= {_MIN_S1_RATIO:g}); "
            "fit from an earlier iteration (--fit-start) or longer runs"
        )

    prob = _Problem(data, huber_delta)
    a_lo, a_hi = (float(v) for v in alpha_bounds)
    u_lo, u_hi = (math.log10(1 - float(lam_bounds[1])), math.log10(1 - float(lam_bounds[0])))
    if lam is not None and not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam}")

    # Search in the unit box: x[0] -> log α, x[1] -> log10(1 - λ) (α spans decades).
    def decode(x: np.ndarray) -> tuple[float, float]:
        alpha = math.exp(math.log(a_lo) + x[0] * (math.log(a_hi) - math.log(a_lo)))
        lam_ = lam if lam is not None else 1.0 - 10 ** (u_lo + x[1] * (u_hi - u_lo))
        return alpha, lam_

    def objective(x: np.ndarray) -> float:
        return prob.solve(*decode(x))[0]

    dim = 1 if lam is not None else 2
    g0 = np.linspace(0, 1, 13)
    g1 = np.linspace(0, 1, 7) if dim == 2 else np.array([0.0])
    grid = [np.array([a, u])[:dim] for a in g0 for u in g1]
    vals = np.array([objective(x) for x in grid])
    # Starts: the best grid points that are not neighbours of a better one already taken.
    chosen: list[np.ndarray] = []
    for i in np.argsort(vals):
        if all(np.max(np.abs(grid[i] - c)) > 0.1 for c in chosen):
            chosen.append(grid[i])
        if len(chosen) >= max(1, n_starts):
            break
    best_x, best_v = None, math.inf
    for x0 in chosen:
        x, v = _nelder_mead(objective, x0, step=0.06)
        if v < best_v:
            best_x, best_v = x, v
    assert best_x is not None
    alpha, lam_ = decode(best_x)
    obj, (L0, A, C) = prob.solve(alpha, lam_)
    params = LawParams(L0=float(L0), A=float(A), alpha=float(alpha), C=float(C), lam=float(lam_))

    # Parameters stuck on a bound mean the data did not constrain them (or the law is wrong).
    edge = 1e-3
    if best_x[0] < edge or best_x[0] > 1 - edge:
        warn.append(f"alpha = {alpha:.4g} is at its bound {alpha_bounds}: weakly identified")
    if dim == 2 and best_x[1] < edge:
        warn.append(
            f"lam = {lam_:.6g} is at its upper bound: the annealing benefit keeps growing "
            "long after the LR drop (possibly beyond the bound)"
        )
    if dim == 2 and best_x[1] > 1 - edge:
        warn.append(
            f"lam = {lam_:.6g} is at its lower bound: the loss follows LR drops within a "
            "few steps, so lam is not identified (any small value fits alike)"
        )
    if L0 <= 0:
        warn.append(
            "L0 = 0 (its bound): the runs are far from the irreducible loss, so L0 and A are "
            "not separately identified; predictions inside the fitted range are unaffected, "
            "extrapolations to much longer runs are not reliable"
        )
    if C <= 0:
        warn.append("C = 0: the fit finds no benefit from annealing")
    if A <= 0:
        warn.append("A = 0: the fit finds no dependence on the LR area S1")

    fits = []
    for (run, steps, obs), raw in zip(data, raws):
        pred = predict_loss(params, run.lrs, steps, loss_lag=run.loss_lag)
        fits.append(_run_fit(run.name, steps, obs, raw, pred))
    pred_all = np.concatenate([f.predicted for f in fits])
    obs_all = np.concatenate([f.observed for f in fits])
    return FitResult(
        params=params,
        runs=fits,
        mape=mape(pred_all, obs_all),
        rmse=float(np.sqrt(np.mean((pred_all - obs_all) ** 2))),
        objective=obj,
        huber_delta=huber_delta,
        smooth_window=int(max(windows)),
        fit_start=starts,
        lam_fixed=lam is not None,
        n_starts=len(chosen),
        n_evals=prob.n_evals,
        warnings=warn,
    )


def _run_fit(name: str, steps, obs, raw, pred) -> RunFit:
    return RunFit(
        name=name,
        steps=np.asarray(steps),
        observed=np.asarray(obs),
        raw=np.asarray(raw),
        predicted=np.asarray(pred),
        mape=mape(pred, obs),
        mape_raw=mape(pred, raw),
        rmse=float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(obs)) ** 2))),
        noise_mape=mape(obs, raw),
    )


def evaluate(
    params: LawParams,
    run: Run,
    *,
    smooth_window: int | None = None,
    start: int | None = None,
) -> RunFit:
    """Compare the law's prediction with a run's observed (smoothed) loss from ``start`` on.

    Defaults as in :func:`fit_law`: smoothing window 5 % of the run, :func:`default_fit_start`.
    """
    if not run.has_loss:
        raise ValueError(f"{run.name}: no observed loss to compare with")
    st, _, sm = _smoothed_from(run, start, smooth_window)
    keep = run.steps >= st
    if not np.any(keep):
        raise ValueError(f"{run.name}: no loss values at or after iteration {st}")
    steps = run.steps[keep]
    pred = predict_loss(params, run.lrs, steps, loss_lag=run.loss_lag)
    return _run_fit(run.name, steps, sm[keep], run.loss[keep], pred)
