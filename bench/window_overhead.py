"""Training step time with WSM window saving off / sync / async, and window vs full size.

    python bench/window_overhead.py [--interval 10 --rounds 3] [pretrain_moe.py flags]
    torchrun --nproc-per-node 2 bench/window_overhead.py --expert-model-parallel-size 2

One process group, one model: the three variants run in interleaved blocks of ``interval``
steps, each block ending with the window save of its variant (none, a synchronous
``dist_checkpointing`` save, or an async one finalised in the following steps), so the
per-step time includes the amortised cost of one save per ``interval`` steps.
Goal (issue 5): async <= 1.02 x off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from _common import BENCH_MODEL, build, rank0, summary, time_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--interval", type=int, default=10, help="steps per window save")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args()

    from megatron_wsm import distributed as wdist
    from megatron_wsm.checkpoint.layout import prune_window_dir
    from megatron_wsm.checkpoint.manifest import KIND_FULL, KIND_WINDOW
    from megatron_wsm.moe_metrics import ExpertLoadCallback
    from megatron_wsm.training import train_step

    comp, manager = build([*BENCH_MODEL, *rest])
    expert_counts = ExpertLoadCallback()  # a trainer step ends its batch of expert counts

    def trainer_step() -> None:
        expert_counts.after_step(comp, train_step(comp))

    root = tempfile.mkdtemp(prefix="wsm_bench_") if wdist.rank() == 0 else None
    root = _broadcast(root)
    counter = {"sync": 0, "async": 0}

    def make_variant(mode: str):
        state = {"n": 0}

        def step() -> None:
            trainer_step()
            manager.poll()
            state["n"] += 1
            if mode != "off" and state["n"] % args.interval == 0:
                counter[mode] += 1
                manager.save(
                    f"{root}/{mode}",
                    KIND_WINDOW,
                    comp.state,
                    comp.last_lr,
                    async_save=(mode == "async"),
                )
                if wdist.rank() == 0:
                    prune_window_dir(f"{root}/{mode}", 0, None)  # keep only the newest

        return step

    for _ in range(3):
        trainer_step()
    # One save of each kind first: process pools start, and gives the sizes.
    manager.save(f"{root}/size_window", KIND_WINDOW, comp.state, comp.last_lr)
    manager.save(f"{root}/size_full", KIND_FULL, comp.state, comp.last_lr)
    manager.save(f"{root}/warm", KIND_WINDOW, comp.state, comp.last_lr, async_save=True)
    manager.wait()
    variants = {m: make_variant(m) for m in ("off", "sync", "async")}
    times = time_blocks(variants, args.interval, args.rounds)
    wait_start = time.perf_counter()
    manager.wait()
    tail = time.perf_counter() - wait_start
    result = summary(times, "off")
    if rank0():
        from megatron_wsm.checkpoint.layout import list_checkpoints

        sizes = {
            kind: list_checkpoints(f"{root}/size_{kind}")[0].size_bytes()
            for kind in ("window", "full")
        }
        for name, r in result.items():
            print(
                f"window saving {name:5s}: {r['median_s'] * 1000:8.1f} ms/step  "
                f"ratio {r['ratio']:.3f}"
            )
        print(f"saves per variant: {counter}; one every {args.interval} steps; "
              f"{tail:.2f} s waited for the last async save at the end")
        print(
            f"window checkpoint {sizes['window'] / 2**20:.2f} MiB, full checkpoint "
            f"{sizes['full'] / 2**20:.2f} MiB: window = "
            f"{100 * sizes['window'] / sizes['full']:.1f}% of full"
        )
        print(
            f"async ratio {result['async']['ratio']:.3f} (goal <= 1.02), "
            f"sync ratio {result['sync']['ratio']:.3f}"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"variants": result, "bytes": sizes}, f, indent=2)
        shutil.rmtree(root, ignore_errors=True)


def _broadcast(value):
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    main()
