"""One merged readout (``--wsm-eval-methods``) vs merging to disk and evaluating from disk,
and what readouts cost a training run at the demo's evaluation interval.

    python bench/readout_bench.py [--rounds 3] [pretrain_moe.py flags]
    torchrun --nproc-per-node 2 bench/readout_bench.py --expert-model-parallel-size 2

One process group, one model (the demo's, by default), a window filled by real training with
the trainer's own callbacks. Then, interleaved ``--rounds`` times:

* readout: the merge built in memory from the window, swapped in, evaluated, swapped out
  (:class:`megatron_wsm.readout_callback.ReadoutCallback`, what the trainer runs);
* tools: what a user runs without the readout — ``merge_wsm.py --load-dir`` to disk, then
  ``evaluate.py --load`` on the result (same evaluation set, same process count), as
  subprocesses from rank 0;
* disk (in process): the same work without the tools' start-up — ``merge_checkpoints`` of the
  same window and coefficients to a directory, ``CheckpointManager.load`` of it (CRC check
  included) into the bench's model, one evaluation.

Goal (issue 16): readout / tools <= 0.5. The training slowdown at ``--eval-interval`` N is
``(N x step + eval + readout) / (N x step + eval)`` from the step, live-evaluation and
readout times measured here (the window saves are paid with or without readouts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import build, rank0

#: The demo's model and evaluation (scripts/demo.sh).
DEMO = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-experts", "4", "--moe-router-topk", "2", "--seq-length", "128",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-iters", "8",
    "--lr", "3e-3", "--lr-decay-style", "stable", "--train-iters", "100000",
    "--log-interval", "1000000", "--no-progress-bar",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="1-sqrt")
    parser.add_argument("--wsm-interval", type=int, default=10)
    parser.add_argument("--wsm-window", type=int, default=50)
    parser.add_argument("--eval-interval", type=int, default=100, help="the demo's")
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args()

    from megatron_wsm import distributed as wdist
    from megatron_wsm.checkpoint_callback import CheckpointCallback
    from megatron_wsm.merge import merge_checkpoints
    from megatron_wsm.moe_metrics import ExpertLoadCallback
    from megatron_wsm.readout_callback import ReadoutCallback
    from megatron_wsm.training import evaluate, train_step

    # The process group starts inside build(): every rank names the same directory itself.
    root = os.path.join(
        tempfile.gettempdir(), f"wsm_readout_bench_{os.environ.get('MASTER_PORT', os.getpid())}"
    )
    comp, manager = build([
        *DEMO, "--save", f"{root}/ckpt", "--wsm-interval", str(args.wsm_interval),
        "--wsm-window", str(args.wsm_window), "--wsm-eval-methods", args.method,
        "--eval-interval", str(args.eval_interval), *rest,
    ])
    # The trainer's step callbacks, as pretrain.run lists them (logging left out).
    callbacks = [ExpertLoadCallback(), CheckpointCallback(comp.cfg, manager)]
    steps: list[float] = []
    for _ in range(args.wsm_window + args.wsm_interval):  # a full window (and warm-up)
        start = time.perf_counter()
        result = train_step(comp)
        callbacks[0].after_step(comp, result)  # the expert counts: part of a trainer step
        steps.append(time.perf_counter() - start)
        callbacks[1].after_step(comp, result)
    manager.finish_pending()
    step_s = statistics.median(steps[5:])
    readout = ReadoutCallback(comp.cfg, manager)
    plan = readout._plan(comp.state.iteration)
    assert not isinstance(plan, str), plan

    times: dict[str, list[float]] = {"eval": [], "readout": [], "disk": [], "tools": []}
    loss: dict[str, float] = {}
    for r in range(args.rounds):
        start = time.perf_counter()
        live = evaluate(comp)
        loss["live"] = live["loss"]
        times["eval"].append(time.perf_counter() - start)

        start = time.perf_counter()
        (row,) = readout.at_evaluation(comp, live)
        times["readout"].append(time.perf_counter() - start)
        loss["readout"] = row["loss"]

        start = time.perf_counter()
        out = f"{root}/merged_{r}"
        merge_checkpoints(list(plan.paths), list(plan.coefficients), out, progress=False)
        manager.load(out, load_optim=False, load_rng=False)
        loss["disk"] = evaluate(comp)["loss"]
        times["disk"].append(time.perf_counter() - start)
        # Back to the trained weights for the next round's live evaluation.
        manager.load(plan.newest_path, load_optim=False, load_rng=False)

        start = time.perf_counter()
        if wdist.rank() == 0:
            loss["tools"] = _tools(root, r, args.method, rest)
        wdist.barrier()
        times["tools"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["readout"] / med["tools"]
    base = args.eval_interval * step_s + med["eval"]
    slowdown = (base + med["readout"]) / base
    if rank0():
        window_bytes = sum(
            sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
            for p in plan.paths
        )
        print(f"window: {len(plan.paths)} checkpoints, {window_bytes / 2**20:.2f} MiB, "
              f"coefficients {', '.join(f'{c:.4f}' for c in plan.coefficients)}")
        print(f"train step {step_s * 1000:.1f} ms; live eval {med['eval']:.3f} s")
        print(f"readout (in memory + eval) {med['readout']:.3f} s; merge_wsm.py + evaluate.py "
              f"{med['tools']:.3f} s: ratio {ratio:.3f} (goal <= 0.5)")
        print(f"in process, without the tools' start-up: merge to disk + load + eval "
              f"{med['disk']:.3f} s: readout / that {med['readout'] / med['disk']:.3f}")
        print(f"losses: live {loss['live']:.4f}, readout {loss['readout']:.6f}, "
              f"from disk {loss['disk']:.6f}, tools {loss['tools']:.6f}")
        print(f"training slowdown with one readout every {args.eval_interval} iterations: "
              f"{slowdown:.3f} x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"medians_s": med, "step_s": step_s, "ratio": ratio,
                           "slowdown": slowdown, "losses": loss}, f, indent=2)
        shutil.rmtree(root, ignore_errors=True)
    wdist.destroy_distributed()


def _tools(root: str, r: int, method: str, layout: list[str]) -> float:
    """``merge_wsm.py`` then ``evaluate.py`` as subprocesses, the bench's process count; the
    evaluated loss."""
    import subprocess
    import sys

    world = int(os.environ.get("WORLD_SIZE", "1"))
    repo = Path(__file__).resolve().parents[1]
    # The bench's own rendezvous (a single process sets MASTER_PORT itself and still holds
    # it) must not reach the tools: each starts its own process group.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}

    def launch(script: str, *argv: str) -> None:
        head = [sys.executable]
        if world > 1:
            head += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(world)]
        subprocess.run([*head, str(repo / script), *argv], check=True, capture_output=True,
                       env=env)

    merged = f"{root}/tools_merged_{r}"
    launch("tools/merge_wsm.py", "--load-dir", f"{root}/ckpt/wsm_window", "--method", method,
           "--save", merged, "--no-progress-bar")
    out = f"{root}/tools_eval_{r}.json"
    launch("tools/evaluate.py", "--load", merged, "--eval-iters", "8", "--global-batch-size",
           "8", "--micro-batch-size", "4", "--output-json", out, *layout)
    with open(out) as f:
        return json.load(f)["loss"]


if __name__ == "__main__":
    main()
