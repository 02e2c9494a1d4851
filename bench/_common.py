"""Shared pieces of the benchmarks: build a run in-process, time steps robustly."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

#: A small MoE whose CPU step takes ~100 ms: big enough that per-step overheads show.
BENCH_MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-experts",
    "8",
    "--moe-router-topk",
    "2",
    "--seq-length",
    "128",
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--log-interval",
    "1000000",
    "--eval-interval",
    "0",
    "--no-progress-bar",
    "--train-iters",
    "100000",
]


def build(argv: Sequence[str]):
    """(Components, CheckpointManager) of a run configured by pretrain_moe.py flags."""
    from megatron_wsm.arguments import parse_run_config
    from megatron_wsm.pretrain import setup

    cfg, _ = parse_run_config(list(argv))
    return setup(cfg)


def time_blocks(
    variants: dict[str, Callable[[], None]], steps_per_block: int, rounds: int
) -> dict[str, list[float]]:
    """Per-step seconds of each variant, measured in interleaved blocks (A B A B ...), so slow
    drifts of a shared machine hit every variant alike.

    The order stays the same every round on purpose: a block that follows a block of the
    *same* code runs faster (warm caches, allocator), so an order that reverses (A B, B A, ...)
    hands that bonus to the variants at its ends and biases a two-variant ratio by ~2 % on this
    VM. In strict alternation every block follows a block of the other variant.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            _synchronize()
            start = time.perf_counter()
            for _ in range(steps_per_block):
                step()
            _synchronize()  # CUDA work is queued: a block ends when the GPU has done it
            times[name].append((time.perf_counter() - start) / steps_per_block)
    return times


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paired_ratios(times: dict[str, list[float]], name: str, baseline: str) -> list[float]:
    """Per-round ratios ``name / baseline``: each compares two blocks run next to each other,
    so a slow minute of the machine cancels out of the pair."""
    return [t / b for t, b in zip(times[name], times[baseline], strict=True)]


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median per-step time of each variant and its time ratio to the baseline.

    ``ratio`` is the median of the per-round paired ratios (:func:`paired_ratios`), which is
    far less noisy on a shared machine than the ratio of the two medians; ``ratio_low`` and
    ``ratio_high`` bound its 95 % bootstrap confidence interval (the precision to quote).
    """
    result = {}
    for name, t in times.items():
        pairs = paired_ratios(times, name, baseline)
        low, high = median_confidence_interval(pairs)
        result[name] = {
            "median_s": statistics.median(t),
            "ratio": statistics.median(pairs),
            "ratio_low": low,
            "ratio_high": high,
        }
    return result


def median_confidence_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 4000
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``values`` (fixed seed, so a
    given set of timings always reports the same interval)."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(data, size=(resamples, data.size), replace=True), axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return float(low), float(high)


def rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
