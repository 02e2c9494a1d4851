"""Start-up costs megatron-wsm removes on machines without CUDA, each against the baseline of
bare megatron-core measured in the same run (fresh processes, variants interleaved A B A B …).

    python bench/cpu_startup.py [--rounds 5]

- import: ``import megatron.core`` + the GPT/MoE modules, bare (megatron-core's ``jit_fuser`` is
  ``torch.compile``: TorchDynamo and Inductor are imported) vs after ``megatron_wsm.mcore_prelude``
  (its CPU import shim makes ``jit_fuser`` the plain function).
- first save: a process's first ``dist_checkpointing.save`` with megatron-core's write-results
  Manager started by ``spawn`` (its default; the server imports torch to unpickle the first
  result) vs ``fork`` (what the trainer uses without CUDA).

Goal: each ratio (ours / baseline) < 1; printed as median seconds and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = "megatron.core, megatron.core.models.gpt, megatron.core.transformer.moe.moe_layer"
IMPORTS = {
    "bare megatron-core": f"import torch, {MODULES}",
    "through megatron_wsm": f"import megatron_wsm.mcore_prelude, torch, {MODULES}",
}


def _save_child(method: str) -> None:
    """In a fresh process: the first torch_dist save with the Manager started by ``method``."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_wsm import cpu_compat
    from megatron_wsm.ports import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cpu_compat.apply()
    manager = SyncManager(ctx=multiprocessing.get_context(method))
    manager.start()
    filesystem_async._results_queue = manager.Queue()
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.randn(512, 512))}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        dist_checkpointing.save(state, root)
        seconds = time.perf_counter() - start
    dist.destroy_process_group()
    print(json.dumps({"seconds": seconds}))


def _timed(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["seconds"] if lines else elapsed


def _compare(name: str, variants: dict[str, list[str]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant, argv in variants.items():
            times[variant].append(_timed(argv))
    (base, base_t), (ours, ours_t) = times.items()
    ratio = statistics.median(o / b for o, b in zip(ours_t, base_t))
    print(
        f"{name}: {base} {statistics.median(base_t):.2f} s, {ours} "
        f"{statistics.median(ours_t):.2f} s, ratio {ratio:.2f} (median of {rounds} pairs)"
    )
    return {"baseline_s": statistics.median(base_t), "ours_s": statistics.median(ours_t),
            "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--save-child", choices=["spawn", "fork"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_child:
        _save_child(args.save_child)
        return
    py = sys.executable
    results = {
        "import": _compare(
            "import", {k: [py, "-c", code] for k, code in IMPORTS.items()}, args.rounds
        ),
        "first_save": _compare(
            "first torch_dist save",
            {m: [py, __file__, "--save-child", m] for m in ("spawn", "fork")},
            args.rounds,
        ),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
