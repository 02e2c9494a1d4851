"""The annealing loss law: LR areas S1, S2 and the predicted loss.

See :mod:`megatron_wsm.annealing` for the law, its conventions and references.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: The law, as printed in tables, plots and JSON.
LAW = "L(s) = L0 + A*S1(s)^(-alpha) - C*S2(s)"


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
