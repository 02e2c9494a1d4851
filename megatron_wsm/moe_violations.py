"""MoE load-balance violations from expert counts: metric names, the arithmetic, batch means.

Pure functions of ``[L, E]`` count tensors (no process groups, no hooks); the definitions and
conventions are in :mod:`megatron_wsm.moe_metrics` (which counts the loads with router hooks,
reduces them over ranks and re-exports every name here) and docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# Metric names: the single source of truth for TensorBoard tags, console names and JSON keys.
# ---------------------------------------------------------------------------------------------

_PREFIX = "moe"
MEAN_GLOBAL_MAX_VIOLATION = f"{_PREFIX}/mean_global_max_violation"
MEAN_GLOBAL_MIN_VIOLATION = f"{_PREFIX}/mean_global_min_violation"
MEAN_BATCH_MAX_VIOLATION = f"{_PREFIX}/mean_batch_max_violation"
MEAN_BATCH_MIN_VIOLATION = f"{_PREFIX}/mean_batch_min_violation"

#: Short names for the console log line (Megatron style ``" name: value |"``).
_CONSOLE_NAMES = {
    MEAN_GLOBAL_MAX_VIOLATION: "moe max vio",
    MEAN_GLOBAL_MIN_VIOLATION: "moe min vio",
    MEAN_BATCH_MAX_VIOLATION: "moe batch max vio",
    MEAN_BATCH_MIN_VIOLATION: "moe batch min vio",
}
#: The tags the console log line shows (the two global means, as the issue asks).
CONSOLE_TAGS = (MEAN_GLOBAL_MAX_VIOLATION, MEAN_GLOBAL_MIN_VIOLATION)

# JSON keys of :func:`eval_summary` (the slide's names, without the TensorBoard prefix).
_JSON_MEAN_MAX = "mean_global_max_violation"
_JSON_MEAN_MIN = "mean_global_min_violation"
_JSON_MAX = "global_max_violation"
_JSON_MIN = "global_min_violation"
_JSON_LOAD = "expert_load"
_JSON_LAYERS = "moe_layers"


def tag_index(layer: int) -> int:
    """The index a per-layer TensorBoard tag uses for global (1-based) layer ``layer``.

    megatron-core names its per-layer scalars ``moe/<name>_layer_{i}`` with ``i`` counted from
    0 (``enumerate`` over the tracker's rows, row ``layer_number - 1``); our tags use the same
    index so both series line up for the same layer.
    """
    if layer < 1:
        raise ValueError(f"layer numbers are 1-based, got {layer}")
    return layer - 1


def global_max_violation_tag(layer: int) -> str:
    """TensorBoard tag of the global max violation of global (1-based) layer ``layer``; the tag
    counts layers from 0 like megatron-core's (``layer_0`` is layer 1)."""
    return f"{_PREFIX}/global_max_violation/layer_{tag_index(layer)}"


def global_min_violation_tag(layer: int) -> str:
    """TensorBoard tag of the global min violation of global (1-based) layer ``layer``; the tag
    counts layers from 0 like megatron-core's (``layer_0`` is layer 1)."""
    return f"{_PREFIX}/global_min_violation/layer_{tag_index(layer)}"


def expert_load_tag(layer: int) -> str:
    """TensorBoard histogram tag of the per-expert load of global (1-based) layer ``layer``; the
    tag counts layers from 0 like megatron-core's (``layer_0`` is layer 1)."""
    return f"{_PREFIX}/expert_load/layer_{tag_index(layer)}"


def console_name(tag: str) -> str:
    """Short console name of a mean tag (falls back to the tag itself)."""
    return _CONSOLE_NAMES.get(tag, tag)


def format_console(metrics: dict[str, float], tags: Iterable[str] = CONSOLE_TAGS) -> str:
    """Console fragment ``" moe max vio: 0.5450 | moe min vio: 0.2010 |"``; absent tags skipped."""
    return "".join(f" {console_name(tag)}: {metrics[tag]:.4f} |" for tag in tags if tag in metrics)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic.
# ---------------------------------------------------------------------------------------------


def violations(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised max / min violation over the last dimension.

    Args:
        counts: ``[..., E]`` non-negative loads (any integer or float dtype), e.g. ``[L, E]``.

    Returns:
        ``(max_v, min_v)``, float64 tensors of shape ``counts.shape[:-1]`` on ``counts.device``.
        A row whose loads are all zero gives 0.0 (see module docstring). No host sync.
    """
    if counts.dim() < 1 or counts.shape[-1] < 1:
        raise ValueError(
            f"expected counts of shape [..., E] with E >= 1, got {tuple(counts.shape)}"
        )
    # float64: counts reach ~1e12 over long windows; float32 would lose the integer precision
    # that makes "zero iff perfectly even" exact.
    c = counts.to(torch.float64)
    mean = c.sum(-1) / c.shape[-1]
    has_load = mean > 0
    # Divide by 1 where mean == 0 so no inf/nan is ever produced, then select 0.0 there.
    denom = torch.where(has_load, mean, torch.ones_like(mean))
    zero = torch.zeros_like(mean)
    max_v = torch.where(has_load, (c.amax(-1) - mean) / denom, zero)
    min_v = torch.where(has_load, (mean - c.amin(-1)) / denom, zero)
    # mean is computed by a rounded division; clamp so float rounding can never report a
    # (tiny) negative violation.
    return max_v.clamp_min_(0.0), min_v.clamp_min_(0.0)


def _check_load(load: torch.Tensor) -> None:
    if load.dim() != 1:
        raise ValueError(f"expected a 1-D load [E], got shape {tuple(load.shape)}")
    if bool((load < 0).any()):
        raise ValueError("expert loads must be non-negative")


def max_violation(load: torch.Tensor) -> float:
    """``(max_e load_e - mean) / mean`` of a 1-D load ``[E]``; 0.0 when all loads are zero."""
    _check_load(load)
    return float(violations(load)[0])


def min_violation(load: torch.Tensor) -> float:
    """``(mean - min_e load_e) / mean`` of a 1-D load ``[E]``; 0.0 when all loads are zero."""
    _check_load(load)
    return float(violations(load)[1])


def moe_layer_numbers(num_layers: int, moe_layer_freq: int | Sequence[int]) -> list[int]:
    """Global 1-based numbers of the MoE layers, as megatron-core's GPT layer specs decide them.

    ``moe_layer_freq`` is an int N (layer ``i`` is MoE iff ``(i - 1) % N == 0``) or a 0/1 list of
    length ``num_layers`` (1 = MoE), the same rule as ``get_gpt_decoder_block_spec``.
    """
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {moe_layer_freq}")
        return [i + 1 for i in range(num_layers) if i % moe_layer_freq == 0]
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers or any(p not in (0, 1) for p in pattern):
        raise ValueError(f"moe_layer_freq must be {num_layers} zeros/ones, got {pattern}")
    return [i + 1 for i, p in enumerate(pattern) if p == 1]


def _resolve_layers(counts: torch.Tensor, moe_layers: Sequence[int] | None) -> list[int]:
    """Explicit MoE layers (validated) or, when None, the layers whose row is non-zero."""
    if counts.dim() != 2:
        raise ValueError(f"expected counts [L, E], got shape {tuple(counts.shape)}")
    num_layers = counts.shape[0]
    if moe_layers is None:
        present = (counts.sum(-1) > 0).nonzero().flatten().tolist()
        return [i + 1 for i in present]
    layers = sorted({int(i) for i in moe_layers})
    bad = [i for i in layers if not 1 <= i <= num_layers]
    if bad:
        raise ValueError(f"layer numbers {bad} outside 1..{num_layers} (they are 1-based)")
    return layers


def summarize(counts: torch.Tensor, moe_layers: Sequence[int] | None = None) -> dict[str, float]:
    """Global violation metrics of window counts: TensorBoard tag -> value.

    Args:
        counts: ``[L, E]`` GLOBAL (reduced) counts summed over the window; row ``i-1`` = layer i.
        moe_layers: global 1-based MoE layer numbers; None = the layers with a non-zero row.

    Returns:
        ``global_max_violation_tag(i)`` / ``global_min_violation_tag(i)`` for each MoE layer and
        ``MEAN_GLOBAL_MAX_VIOLATION`` / ``MEAN_GLOBAL_MIN_VIOLATION`` (plain means over those
        layers). Empty when there is no MoE layer. One host sync.
    """
    layers = _resolve_layers(counts, moe_layers)
    if not layers:
        return {}
    max_v, min_v = violations(counts)
    mx, mn = max_v.tolist(), min_v.tolist()  # a single device->host copy each
    out: dict[str, float] = {}
    for i in layers:
        out[global_max_violation_tag(i)] = mx[i - 1]
        out[global_min_violation_tag(i)] = mn[i - 1]
    out[MEAN_GLOBAL_MAX_VIOLATION] = math.fsum(mx[i - 1] for i in layers) / len(layers)
    out[MEAN_GLOBAL_MIN_VIOLATION] = math.fsum(mn[i - 1] for i in layers) / len(layers)
    return out


def histograms(
    counts: torch.Tensor, moe_layers: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Histogram tag -> per-expert load ``[E]`` (CPU int64) for each MoE layer, for TensorBoard."""
    layers = _resolve_layers(counts, moe_layers)
    rows = counts.detach().to("cpu")
    return {expert_load_tag(i): rows[i - 1].clone() for i in layers}


def eval_summary(counts: torch.Tensor, moe_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """JSON-friendly evaluation result of GLOBAL counts over the whole evaluation set.

    Returns ``{"moe_layers": [...], "mean_global_max_violation": x,
    "mean_global_min_violation": y, "global_max_violation": {"<layer>": v, ...},
    "global_min_violation": {...}, "expert_load": {"<layer>": [counts...]}}`` (layer keys are
    strings because JSON object keys are). Means are None when there is no MoE layer.
    """
    layers = _resolve_layers(counts, moe_layers)
    metrics = summarize(counts, layers)
    rows = counts.detach().to("cpu").tolist()
    return {
        _JSON_LAYERS: layers,
        _JSON_MEAN_MAX: metrics.get(MEAN_GLOBAL_MAX_VIOLATION),
        _JSON_MEAN_MIN: metrics.get(MEAN_GLOBAL_MIN_VIOLATION),
        _JSON_MAX: {str(i): metrics[global_max_violation_tag(i)] for i in layers},
        _JSON_MIN: {str(i): metrics[global_min_violation_tag(i)] for i in layers},
        _JSON_LOAD: {str(i): rows[i - 1] for i in layers},
    }


# ---------------------------------------------------------------------------------------------
# Batch violations.
# ---------------------------------------------------------------------------------------------


class BatchViolationAccumulator:
    """Running sums of per-global-batch violations, per layer, kept on the counts' device.

    ``add`` takes one global batch's GLOBAL counts; the window's *batch* violation of a layer is
    the mean of its per-batch violations over the batches in which the layer saw tokens (all of
    them in practice); ``summary`` averages that over MoE layers.
    """

    def __init__(self, num_layers: int, device: torch.device | str | None = None) -> None:
        """Create empty sums for ``num_layers`` layers on ``device``."""
        self.num_layers = num_layers
        self._max_sum = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self._min_sum = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self._batches = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.num_batches = 0

    def reset(self) -> None:
        """Forget all batches."""
        self._max_sum.zero_()
        self._min_sum.zero_()
        self._batches.zero_()
        self.num_batches = 0

    def add(self, counts: torch.Tensor) -> None:
        """Add one global batch's ``[L, E]`` global counts. No host sync."""
        if counts.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} rows, got {tuple(counts.shape)}")
        if counts.device != self._max_sum.device:
            self._max_sum = self._max_sum.to(counts.device)
            self._min_sum = self._min_sum.to(counts.device)
            self._batches = self._batches.to(counts.device)
        max_v, min_v = violations(counts)
        # Dense layers (zero rows) add nothing, so they cannot dilute the layer means.
        seen = (counts.sum(-1) > 0).to(torch.float64)
        self._max_sum += max_v * seen
        self._min_sum += min_v * seen
        self._batches += seen
        self.num_batches += 1

    def per_layer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean_batch_max [L], mean_batch_min [L], batches_seen [L])``, float64, on device."""
        n = self._batches.clamp_min(1.0)
        return self._max_sum / n, self._min_sum / n, self._batches.clone()

    def summary(self, moe_layers: Sequence[int] | None = None) -> dict[str, float]:
        """``MEAN_BATCH_MAX_VIOLATION`` / ``MEAN_BATCH_MIN_VIOLATION``; empty with no batch/layer.

        ``moe_layers`` None = layers that saw tokens in at least one batch.
        """
        if self.num_batches == 0:
            return {}
        mx, mn, seen = (t.tolist() for t in self.per_layer())
        if moe_layers is None:
            layers = [i + 1 for i, s in enumerate(seen) if s > 0]
        else:
            layers = _resolve_layers(torch.empty(self.num_layers, 1), moe_layers)
        if not layers:
            return {}
        return {
            MEAN_BATCH_MAX_VIOLATION: math.fsum(mx[i - 1] for i in layers) / len(layers),
            MEAN_BATCH_MIN_VIOLATION: math.fsum(mn[i - 1] for i in layers) / len(layers),
        }
