"""Annealing loss law: fit it to training logs, predict schedules and WSM merges, plan.

Pure numpy: a learning-rate curve goes in, a loss prediction comes out. Nothing here imports
torch or megatron-core (the CLI, :mod:`megatron_wsm.cli.plan_anneal`, reads logs and may use
megatron-core's scheduler; :func:`trainer_lr_curve` is a numpy twin of it for fast searches,
checked against it in the tests).

The law (Tissue et al., "Scaling Law with Learning Rate Annealing", arXiv 2408.11029)::

    L(s) = L0 + A · S1(s)^(-alpha) - C · S2(s)

over optimizer steps s, with η_i the LR of update i (i = 1, 2, …):

- ``S1(s) = Σ_{i≤s} η_i`` — the *forward area* under the LR curve;
- ``S2(s) = Σ_{i≤s} m_i``, ``m_i = λ·m_{i-1} + Δ_i``, ``Δ_i = η_{i-1} - η_i`` — the
  *annealing area*, a momentum of the LR drops that keeps paying off after the drop. Drops are
  counted from the step the LR first reaches its peak on: warmup is not annealing (counting its
  rises as negative drops would make the law predict a loss *increase* during warmup). A later
  rise (re-warming) does count, negatively.

Seed 003 (Wang et al., arXiv 2512.13705) keeps this split into a forward term and an
annealing-momentum term, argues that *steps* rather than tokens are the right clock, and lets
peak LR and step count enter the fit. Here both enter through the areas themselves: S1 and S2
are sums over steps of the raw LR, so runs with a different peak LR or length share one set of
parameters. (Its model-size term λ_N·N^(-α_N) is a constant for one model and is absorbed into
L0; its Adam-normalised momentum variant is not implemented.)

Conventions:

- ``lrs[i]`` is the LR of update ``i + 1`` (the trainer's ``learning-rate`` at iteration
  ``i + 1``). A dense per-step curve is needed; :meth:`Run.from_points` interpolates gaps.
- The trainer's *training* loss at iteration ``s`` is computed before update ``s``, so it sees
  the areas after ``s - 1`` updates (``loss_lag = 1``); a validation loss logged at iteration
  ``s`` comes after update ``s`` (``loss_lag = 0``). A *final* loss (after the last update,
  e.g. of a merged model) uses the full sums.
- WSM merge (DESIGN.md §1, Theorem 3.1): merging the checkpoints of a window of D steps with
  the coefficients of decay shape f gives the weights that training with LR scaled by
  w_i = f((i-1)/k) over the window's k intervals would give, for the same gradients. Its loss
  is predicted as the final loss of that emulated decay (:func:`merge_lrs`). With Adam and
  real gradients this is an approximation: the bet WSM makes.

Fitting (:func:`fit_law`): variable projection. For given nonlinear parameters (α, λ) the law
is linear in (L0, A, C); those are solved by iteratively reweighted least squares for the
Huber loss on *relative* residuals, with A, C, L0 ≥ 0 enforced exactly (active-set enumeration
over the three bounds). The outer (α, log10(1-λ)) is searched on a grid, and the best grid
points start a bounded Nelder-Mead each ("several starts"); the best result wins.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_ALPHA_BOUNDS",
    "DEFAULT_HUBER_DELTA",
    "DEFAULT_LAM_BOUNDS",
    "LAW",
    "MERGE_METHODS",
    "WSD_SHAPES",
    "FitResult",
    "IdentificationError",
    "LawParams",
    "Run",
    "RunFit",
    "annealing_area",
    "default_fit_start",
    "default_smooth_window",
    "evaluate",
    "final_loss",
    "fit_law",
    "forward_area",
    "mape",
    "merge_lrs",
    "peak_index",
    "predict_loss",
    "search_decay_ratio",
    "search_merge_window",
    "smooth",
    "trainer_lr_curve",
    "warmup_end_step",
]

#: The law, as printed in tables, plots and JSON.
LAW = "L(s) = L0 + A*S1(s)^(-alpha) - C*S2(s)"
#: Huber threshold on relative residuals (pred/obs - 1): 0.5 % — above the noise of a
#: smoothed curve, below the misfit of a transient (loss spike, early-training curvature).
DEFAULT_HUBER_DELTA = 0.005
#: Bounds of the exponent α; loss-vs-area exponents reported are ~0.3-0.6.
DEFAULT_ALPHA_BOUNDS = (0.02, 2.0)
#: Bounds of the momentum factor λ (searched as log10(1 - λ)). The benefit of an LR drop
#: builds up over ~1/(1-λ) steps: λ → 1 keeps paying off long after the drop (what Tissue et
#: al. see on LLMs, λ ≈ 0.999); λ = 0.5 means the loss follows the LR within a couple of steps.
DEFAULT_LAM_BOUNDS = (0.5, 0.9999)
#: WSD decay shapes of the trainer (``--lr-wsd-decay-style``).
WSD_SHAPES = ("linear", "cosine", "exponential", "1-sqrt")
#: Merge methods of :mod:`megatron_wsm.schedule` that make sense to plan with.
MERGE_METHODS = ("1-sqrt", "linear", "mean", "cosine", "ema", "inverse-sqrt", "exponential")

# The trainer's WSD shape names -> megatron_wsm.schedule method names (same formulas).
_WSD_TO_SCHEDULE = {
    "linear": "linear",
    "cosine": "cosine",
    "exponential": "wsd-exponential",
    "1-sqrt": "1-sqrt",
    "minus_sqrt": "1-sqrt",
}
# Minimum relative LR drop (of the peak) that makes the annealing term identifiable.
_MIN_DROP = 0.05
# Minimum max/min ratio of S1 over the fitted points to pin the power law down.
_MIN_S1_RATIO = 2.0


class IdentificationError(ValueError):
    """The logs cannot identify the law's parameters (the message says what is missing)."""


# --------------------------------------------------------------------------- the law


@dataclasses.dataclass(frozen=True)
class LawParams:
    """Parameters of the annealing law (S1, S2 in raw LR × steps units)."""

    L0: float
    A: float
    alpha: float
    C: float
    lam: float

    def to_json(self) -> dict[str, float]:
        """JSON-ready dict (full float64 precision)."""
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LawParams:
        """Inverse of :meth:`to_json`."""
        return cls(**{f.name: float(d[f.name]) for f in dataclasses.fields(cls)})


def _as_lrs(lrs: Iterable[float]) -> np.ndarray:
    arr = np.asarray(lrs, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("the LR curve must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(arr)):
        raise ValueError("the LR curve contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError("the LR curve contains negative learning rates")
    return arr


def peak_index(lrs: Sequence[float] | np.ndarray) -> int:
    """0-based index of the first step whose LR reaches the curve's maximum (end of warmup)."""
    arr = _as_lrs(lrs)
    # A relative tolerance: LRs read back from float32 logs wobble in the last digits.
    return int(np.argmax(arr >= arr.max() * (1.0 - 1e-6)))


def warmup_end_step(lrs: Sequence[float] | np.ndarray) -> int:
    """1-based iteration at which the LR first reaches its peak (1 when there is no warmup)."""
    return peak_index(lrs) + 1


def forward_area(lrs: Sequence[float] | np.ndarray) -> np.ndarray:
    """S1 after each update: ``S1[i] = Σ_{j≤i} lrs[j]`` (so ``S1[s-1]`` is S1 after s steps)."""
    return np.cumsum(_as_lrs(lrs))


def annealing_area(lrs: Sequence[float] | np.ndarray, lam: float) -> np.ndarray:
    """S2 after each update: ``S2[i] = Σ_{j≤i} m_j``, ``m_j = λ m_{j-1} + Δ_j``.

    ``Δ_j = lrs[j-1] - lrs[j]`` for steps after the LR first reaches its peak, 0 before
    (warmup is not annealing). Vectorised in blocks: within a block of B steps
    ``m_i = λ^(i-a+1)·m_{a-1} + λ^(i-a)·Σ_{j=a..i} λ^(a-j)·Δ_j``, with B small enough that
    λ^(-B) stays far from overflow, so long logs (10^5+ steps) cost milliseconds per call.
    """
    arr = _as_lrs(lrs)
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam}")
    drops = np.zeros_like(arr)
    drops[1:] = arr[:-1] - arr[1:]
    drops[: peak_index(arr) + 1] = 0.0
    n = arr.size
    # λ^-B ≤ e^30: exact enough (terms of one block span at most 30 e-folds).
    block = max(1, min(n, int(30.0 / -math.log(lam))))
    m = np.empty(n)
    carry = 0.0
    offsets = np.arange(block, dtype=np.float64)
    grow = lam ** (-offsets)  # λ^(a-j) for j = a..a+B-1
    shrink = lam**offsets  # λ^(i-a)
    for a in range(0, n, block):
        b = min(n, a + block)
        k = b - a
        inner = np.cumsum(drops[a:b] * grow[:k]) * shrink[:k]
        m[a:b] = inner + carry * lam * shrink[:k]
        carry = m[b - 1]
    return np.cumsum(m)


def _areas_at(
    lrs: np.ndarray, steps: np.ndarray, lam: float, lag: int
) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after ``steps - lag`` updates; 0 before the first update."""
    s1 = np.concatenate([[0.0], forward_area(lrs)])
    s2 = np.concatenate([[0.0], annealing_area(lrs, lam)])
    idx = np.asarray(steps, dtype=np.int64) - lag
    if np.any(idx < 0) or np.any(idx > lrs.size):
        raise ValueError(
            f"steps must lie in [{lag}, {lrs.size + lag}] for an LR curve of {lrs.size} steps"
        )
    return s1[idx], s2[idx]


def predict_loss(
    params: LawParams,
    lrs: Sequence[float] | np.ndarray,
    steps: Sequence[int] | np.ndarray | None = None,
    *,
    loss_lag: int = 1,
) -> np.ndarray:
    """Loss predicted by the law at iterations ``steps`` (default 1 + lag … len(lrs)).

    ``loss_lag = 1`` for the trainer's training loss (measured before update ``s``), 0 for a
    loss measured after update ``s``. Steps where no LR area has accrued yet give ``inf``.
    """
    arr = _as_lrs(lrs)
    if steps is None:
        steps = np.arange(1 + loss_lag, arr.size + 1)
    s1, s2 = _areas_at(arr, np.asarray(steps), params.lam, loss_lag)
    with np.errstate(divide="ignore"):
        return params.L0 + params.A * np.power(s1, -params.alpha) - params.C * s2


def final_loss(params: LawParams, lrs: Sequence[float] | np.ndarray) -> float:
    """Loss of the model after the last update of ``lrs`` (a decayed or merged model)."""
    arr = _as_lrs(lrs)
    return float(predict_loss(params, arr, [arr.size], loss_lag=0)[0])


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Run:
    """One training run: its dense LR curve and (optionally) observed losses.

    ``lrs[i]`` is the LR of update ``i + 1``; ``steps`` (1-based iterations, increasing) and
    ``loss`` are the observations, ``loss_lag`` their timing (see the module docstring).
    """

    name: str
    lrs: np.ndarray
    steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    loss: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    loss_lag: int = 1
    tokens_per_step: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.lrs = _as_lrs(self.lrs)
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.loss = np.asarray(self.loss, dtype=np.float64)
        if self.steps.shape != self.loss.shape or self.steps.ndim != 1:
            raise ValueError(f"{self.name}: steps and loss must be 1-D and of equal length")
        if self.steps.size:
            if np.any(np.diff(self.steps) <= 0):
                raise ValueError(f"{self.name}: loss steps must be strictly increasing")
            if self.steps[0] < 1 or self.steps[-1] > self.lrs.size + self.loss_lag:
                raise ValueError(
                    f"{self.name}: loss steps {self.steps[0]}..{self.steps[-1]} fall outside "
                    f"the LR curve (steps 1..{self.lrs.size})"
                )
            if not np.all(np.isfinite(self.loss)):
                raise ValueError(f"{self.name}: the loss contains NaN or infinite values")

    @property
    def has_loss(self) -> bool:
        """True when the run carries observed losses."""
        return bool(self.steps.size)

    @classmethod
    def from_points(
        cls,
        name: str,
        lr_steps: Sequence[int] | np.ndarray,
        lr_values: Sequence[float] | np.ndarray,
        loss_steps: Sequence[int] | np.ndarray = (),
        loss_values: Sequence[float] | np.ndarray = (),
        *,
        loss_lag: int = 1,
        tokens_per_step: float | None = None,
    ) -> Run:
        """Build a run from logged points: LR logged at some iterations, loss at others.

        The LR is interpolated linearly between logged iterations (exact for the trainer, which
        logs every iteration) and held at its first logged value before it, which is noted.
        Duplicate steps (e.g. after a resume) keep the last value.
        """
        ls, lv = _dedup(lr_steps, lr_values)
        if ls.size == 0:
            raise ValueError(f"{name}: no learning-rate values")
        last = int(ls[-1])
        if loss_steps is not None and len(loss_steps):
            last = max(last, int(np.max(np.asarray(loss_steps))) - loss_lag)
        grid = np.arange(1, last + 1)
        lrs = np.interp(grid, ls, lv)
        notes = []
        if ls[0] > 1:
            notes.append(f"LR logged from iteration {ls[0]} only; held at {lv[0]:.3g} before it")
        if ls.size < ls[-1] - ls[0] + 1:
            notes.append("LR logged at some iterations only; interpolated linearly in between")
        ps, pv = _dedup(loss_steps, loss_values)
        return cls(
            name=name,
            lrs=lrs,
            steps=ps,
            loss=pv,
            loss_lag=loss_lag,
            tokens_per_step=tokens_per_step,
            notes=notes,
        )


def _dedup(steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray):
    st = np.asarray(steps, dtype=np.int64).reshape(-1)
    va = np.asarray(values, dtype=np.float64).reshape(-1)
    if st.shape != va.shape:
        raise ValueError("steps and values differ in length")
    if st.size == 0:
        return st, va
    # Stable sort, then keep the last occurrence of each step: a resumed run rewrites steps.
    order = np.argsort(st, kind="stable")
    st, va = st[order], va[order]
    keep = np.append(st[1:] != st[:-1], True)
    return st[keep], va[keep]


def default_fit_start(run: Run) -> int:
    """First iteration fitted/scored by default: after warmup and after 10 % of the run.

    Early training drops the loss far faster than a power law in the LR area (unigram
    statistics are learnt in a few dozen steps); the law describes what follows.
    """
    last = int(run.steps[-1]) if run.has_loss else run.lrs.size
    return max(warmup_end_step(run.lrs), int(math.ceil(0.1 * last)))


def default_smooth_window(n_steps: int) -> int:
    """Default smoothing window (steps): about 5 % of the run, odd, at least 1."""
    w = max(1, int(round(n_steps / 20)))
    return w if w % 2 else w + 1


def _local_linear(x: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    width = window - 1
    lo_step = np.clip(x - width // 2, 0.0, max(0.0, x[-1] - width))
    lo = np.searchsorted(x, lo_step, side="left")
    hi = np.searchsorted(x, lo_step + width, side="right")

    def wsum(v: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[hi] - c[lo]

    n = (hi - lo).astype(np.float64)
    mx, my = wsum(x) / n, wsum(values) / n
    sxx = wsum(x * x) - n * mx * mx
    sxy = wsum(x * values) - n * mx * my
    ok = sxx > 1e-9 * np.maximum(1.0, n * mx * mx)
    slope = np.where(ok, sxy / np.where(ok, sxx, 1.0), 0.0)
    return my + slope * (x - mx)


def smooth(
    steps: np.ndarray, values: np.ndarray, window: int, *, clip_sigmas: float = 4.0
) -> np.ndarray:
    """Robust local linear smoothing: at each step, a line fitted to ``window`` steps around it.

    The window is centred on the point and slides inwards, keeping its width, at the ends.
    A local *line* rather than a mean or an EMA because a curve that is locally linear comes
    out unbiased — centred or not — so neither the start of a decay nor the last logged
    points (the final loss) are shifted; an EMA lags behind a decay and would bias the
    annealing term. Robust: two passes clip residuals beyond ``clip_sigmas`` robust standard
    deviations (1.4826 × MAD) before re-fitting, so isolated loss spikes do not leak into
    their neighbours (a mean is not robust; the Huber fit that follows cannot undo that).
    ``window <= 2`` returns the values unchanged.
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if window <= 2 or values.size < 3:
        return values.copy()
    x = (steps - steps[0]).astype(np.float64)
    fitted = _local_linear(x, values, window)
    for _ in range(2):
        r = values - fitted
        sigma = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if sigma <= 0:
            break
        fitted = _local_linear(
            x, fitted + np.clip(r, -clip_sigmas * sigma, clip_sigmas * sigma), window
        )
    return fitted


def mape(pred: np.ndarray, obs: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    pred = np.asarray(pred, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    return float(np.mean(np.abs(pred - obs) / np.abs(obs)) * 100.0)


# --------------------------------------------------------------------------- fitting


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


def _solve_small(G: list[list[float]], h: list[float]) -> list[float] | None:
    """Solve G x = h for a tiny SPD system (Gaussian elimination on Python floats).

    numpy's per-call overhead dominates 1-3 unknowns, and the fit solves hundreds of
    thousands of them. None when (numerically) singular.
    """
    n = len(h)
    a = [row[:] + [h[i]] for i, row in enumerate(G)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[piv][c]) < 1e-12:
            return None
        a[c], a[piv] = a[piv], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            for k in range(c, n + 1):
                a[r][k] -= f * a[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x


def _bounded_wls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_b Σ w (X b - y)² subject to b ≥ 0 (all columns), exactly.

    Few columns, so every KKT candidate (a subset of coefficients pinned at 0, the others
    free) is tried on the normal equations; the feasible candidate with the smallest
    objective is the optimum of this convex problem. Columns are scaled to unit weighted
    norm first for conditioning.
    """
    Xw = X * w[:, None]
    G = Xw.T @ X
    h = Xw.T @ y
    d = np.sqrt(np.diag(G))
    d[d == 0] = 1.0
    Gs = (G / np.outer(d, d)).tolist()
    hs = (h / d).tolist()
    ncol = X.shape[1]
    best, best_obj = [0.0] * ncol, 0.0  # objective relative to Σ w y² (b = 0 gives 0)
    # Largest free set first: usually the unconstrained optimum is feasible and we stop there.
    for mask in range((1 << ncol) - 1, 0, -1):
        free = [j for j in range(ncol) if mask >> j & 1]
        sol = _solve_small([[Gs[i][j] for j in free] for i in free], [hs[i] for i in free])
        if sol is None or min(sol) < 0:
            continue
        b = [0.0] * ncol
        for j, v in zip(free, sol):
            b[j] = v
        # Σ w (Xb - y)² - Σ w y² = bᵀGb - 2bᵀh; at a solution of the free block it is -bᵀh.
        obj = -sum(b[j] * hs[j] for j in free)
        if mask == (1 << ncol) - 1:
            best = b
            break
        if obj < best_obj:
            best, best_obj = b, obj
    return np.asarray(best) / d


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
    """Minimise ``f`` over the unit box [0, 1]^d from ``x0`` (points clipped into the box)."""
    d = x0.size
    pts = [np.clip(x0, 0, 1)]
    for j in range(d):
        e = x0.copy()
        e[j] += step if x0[j] + step <= 1 else -step
        pts.append(np.clip(e, 0, 1))
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if max(np.max(np.abs(p - pts[0])) for p in pts[1:]) < 1e-5:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = np.clip(centroid + (centroid - pts[-1]), 0, 1)
        fr = f(xr)
        if fr < vals[0]:
            xe = np.clip(centroid + 2 * (centroid - pts[-1]), 0, 1)
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = np.clip(centroid + 0.5 * (pts[-1] - centroid), 0, 1)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                for i in range(1, d + 1):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
    i = int(np.argmin(vals))
    return pts[i], vals[i]


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
        start = fit_start if fit_start is not None else default_fit_start(run)
        # Need some LR area before the first fitted point (S1 > 0).
        start = max(start, 1 + run.loss_lag + (1 if run.lrs[0] == 0 else 0))
        window = (
            smooth_window
            if smooth_window is not None
            else default_smooth_window(int(run.steps[-1] - run.steps[0] + 1))
        )
        windows.append(window)
        sm = smooth(run.steps, run.loss, window)
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
    st = start if start is not None else default_fit_start(run)
    st = max(st, 1 + run.loss_lag + (1 if run.lrs[0] == 0 else 0))
    window = (
        smooth_window
        if smooth_window is not None
        else default_smooth_window(int(run.steps[-1] - run.steps[0] + 1))
    )
    sm = smooth(run.steps, run.loss, window)
    keep = run.steps >= st
    if not np.any(keep):
        raise ValueError(f"{run.name}: no loss values at or after iteration {st}")
    steps = run.steps[keep]
    pred = predict_loss(params, run.lrs, steps, loss_lag=run.loss_lag)
    return _run_fit(run.name, steps, sm[keep], run.loss[keep], pred)


# --------------------------------------------------------------------------- schedules


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


def _wsd_coeff(shape: str, t: np.ndarray) -> np.ndarray:
    if shape == "linear":
        return 1.0 - t
    if shape == "cosine":
        return 0.5 * (np.cos(np.pi * t) + 1.0)
    if shape == "exponential":
        return 2.0 * np.power(0.5, t) - 1.0
    if shape in ("1-sqrt", "minus_sqrt"):
        return 1.0 - np.sqrt(t)
    raise ValueError(f"unknown WSD decay shape {shape!r}; choose from {WSD_SHAPES}")


def merge_lrs(
    base_lrs: Sequence[float] | np.ndarray,
    window_iters: int,
    method: str = "1-sqrt",
    *,
    interval: int | None = None,
    **method_kwargs: Any,
) -> np.ndarray:
    """The LR curve a WSM merge over the last ``window_iters`` steps of ``base_lrs`` emulates.

    The window holds k = window_iters / interval intervals (``interval`` default: the whole
    window in 8 intervals, rounded; 1 = a checkpoint every step). By Theorem 3.1 merging with
    the coefficients of ``method`` scales the updates of interval i by its decay weight
    w_i (:func:`megatron_wsm.schedule.decay_weights`, w_i = f((i-1)/k)), so the emulated LR
    is ``base_lrs × w_i`` over interval i. Its :func:`final_loss` predicts the merged model.
    ``method_kwargs`` (``alpha``, ``final_ratio``, ``min_lr_ratio``) go to ``decay_weights``.
    """
    from megatron_wsm.schedule import decay_weights  # pure Python, no torch

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
    w = np.repeat(np.asarray(decay_weights(method, k, **method_kwargs)), interval)
    base[base.size - window_iters :] *= w
    return base


def search_decay_ratio(
    params: LawParams,
    *,
    train_iters: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_iters: int = 0,
    shapes: Sequence[str] = ("1-sqrt",),
    ratios: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Predicted final loss of WSD runs of ``train_iters`` steps over decay ratios × shapes.

    A ratio r decays over round(r · train_iters) iterations (clipped to the post-warmup part).
    Returns one dict per candidate (``shape``, ``ratio``, ``decay_iters``, ``final_loss``),
    best first.
    """
    if ratios is None:
        ratios = np.round(np.arange(0.025, 0.6001, 0.025), 4)
    out = []
    seen = set()
    for shape in shapes:
        for r in ratios:
            n = int(round(float(r) * train_iters))
            n = min(max(n, 1), train_iters - warmup_iters)
            if (shape, n) in seen:
                continue
            seen.add((shape, n))
            lrs = trainer_lr_curve(
                train_iters=train_iters,
                lr=lr,
                min_lr=min_lr,
                warmup_iters=warmup_iters,
                style="WSD",
                wsd_decay_iters=n,
                wsd_shape=shape,
            )
            out.append(
                {
                    "kind": "wsd",
                    "shape": shape,
                    "ratio": n / train_iters,
                    "decay_iters": n,
                    "final_loss": final_loss(params, lrs),
                }
            )
    out.sort(key=lambda d: d["final_loss"])
    return out


def search_merge_window(
    params: LawParams,
    *,
    train_iters: int,
    lr: float,
    warmup_iters: int = 0,
    methods: Sequence[str] = ("1-sqrt",),
    fractions: Sequence[float] | None = None,
    interval: int | None = None,
    n_intervals: int = 8,
) -> list[dict[str, Any]]:
    """Predicted loss of WSM merges at the end of a stable run of ``train_iters`` steps.

    Window = fraction × train_iters (outside warmup), split into intervals of ``interval``
    steps (a fixed checkpoint spacing, e.g. ``--wsm-interval``) or, when None, into
    ``n_intervals`` equal ones. One dict per candidate (``method``, ``fraction``,
    ``window_iters``, ``interval``, ``final_loss``), best first.
    """
    if fractions is None:
        fractions = np.round(np.arange(0.025, 0.6001, 0.025), 4)
    base = trainer_lr_curve(
        train_iters=train_iters, lr=lr, warmup_iters=warmup_iters, style="stable"
    )
    out = []
    seen = set()
    for method in methods:
        for f in fractions:
            win = int(round(float(f) * train_iters))
            win = min(max(win, 1), train_iters - warmup_iters)
            step = interval if interval is not None else max(1, win // n_intervals)
            win = max(step, win - win % step)  # a whole number of intervals
            if (method, win, step) in seen:
                continue
            seen.add((method, win, step))
            lrs = merge_lrs(base, win, method, interval=step)
            out.append(
                {
                    "kind": "merge",
                    "method": method,
                    "fraction": win / train_iters,
                    "window_iters": win,
                    "interval": step,
                    "n_checkpoints": win // step + 1,
                    "final_loss": final_loss(params, lrs),
                }
            )
    out.sort(key=lambda d: d["final_loss"])
    return out
