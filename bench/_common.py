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
    """Per-step seconds of each variant, measured in interleaved blocks (A B C A B C ...), so
    slow drifts of a shared machine hit every variant alike."""
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


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median per-step time of each variant and its ratio to the baseline's median."""
    base = statistics.median(times[baseline])
    return {
        name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base}
        for name, t in times.items()
    }


def rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
