"""Training step time with the MoE load-balance metrics on / off, from one run.

    python bench/metrics_overhead.py [--rounds 6 --steps 5] [pretrain_moe.py flags]

"on" = router hooks counting tokens per expert + the per-global-batch reduction and
violation arithmetic (``ExpertLoadTracker.end_batch``); "off" = hooks detached. Same model,
interleaved blocks. Goal (issue 7): on/off <= 1.01.
"""

from __future__ import annotations

import argparse
import json

from _common import BENCH_MODEL, build, rank0, summary, time_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args()

    from megatron_wsm.moe_metrics import ExpertLoadCallback, ExpertLoadTracker
    from megatron_wsm.training import train_step

    comp, _ = build([*BENCH_MODEL, *rest])
    if comp.load_tracker is not None:
        comp.load_tracker.detach()
    tracker = ExpertLoadTracker.for_model(comp.model, comp.transformer_config)
    tracker.detach()
    expert_counts = ExpertLoadCallback()  # the trainer's: ends the batch of comp.load_tracker

    def off() -> None:
        comp.load_tracker = None
        expert_counts.after_step(comp, train_step(comp))

    def on() -> None:
        comp.load_tracker = tracker
        expert_counts.after_step(comp, train_step(comp))

    def switch(fn, attach: bool):
        def block_step() -> None:
            if attach and not tracker._handles:
                tracker.attach(
                    comp.model,
                    num_layers=tracker_layers,
                    num_experts=experts,
                    topk=topk,
                    reduce_fn=tracker.reduce_fn,
                )
            if not attach and tracker._handles:
                tracker.detach()
            fn()

        return block_step

    cfg = comp.transformer_config
    tracker_layers, experts, topk = cfg.num_layers, cfg.num_moe_experts, cfg.moe_router_topk
    for _ in range(3):
        switch(on, True)()
        switch(off, False)()
    times = time_blocks(
        {"off": switch(off, False), "on": switch(on, True)}, args.steps, args.rounds
    )
    result = summary(times, "off")
    if rank0():
        for name, r in result.items():
            print(f"metrics {name:3s}: {r['median_s'] * 1000:8.1f} ms/step  ratio {r['ratio']:.4f}")
        print(
            f"metrics on/off = {result['on']['ratio']:.4f} (goal <= 1.01); "
            f"interval metrics: {tracker.interval_metrics()}"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
