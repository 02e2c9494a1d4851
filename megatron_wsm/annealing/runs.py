"""Training runs (dense LR curve + observed losses) and robust smoothing of their loss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from megatron_wsm.annealing.law import _as_lrs, warmup_end_step


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
