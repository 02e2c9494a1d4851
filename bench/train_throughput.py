"""Tokens/s of megatron-wsm's training step vs a bare megatron-core loop on the same model.

    python bench/train_throughput.py [--rounds 150 --steps 1] [pretrain_moe.py flags]
    torchrun --nproc-per-node 2 bench/train_throughput.py --expert-model-parallel-size 2
    python bench/train_throughput.py --family deepseek     # a Megatron-LM model family

``--family`` appends one family's model flags (``megatron_wsm.testing.families``: the flags of
Megatron-LM's Mixtral, Qwen3-MoE and DeepSeek scripts) to the bench model; its sizes stay the
bench's except where the family sets its own (DeepSeek's layer count and FFN widths).

Both variants drive the same GPTModel/DDP/optimizer objects, alternating in blocks. The bare
loop is what a minimal megatron-core user writes: zero grads, ``get_forward_backward_func``
over pre-collated micro-batches already in memory, ``optimizer.step()``, scheduler step —
no data loading, no loss reduction, no metrics. Ours is ``training.train_step`` (data from
GPTDataset, world-reduced loss, LR bookkeeping) and the trainer's MoE counters
(``moe_metrics.ExpertLoadCallback``). Goal: ratio >= 0.98.

The ratio is the median over rounds of paired blocks (each round times one step of each loop,
back to back, in strict alternation), printed with its 95 % bootstrap confidence interval: on a
shared 2-core VM single steps vary by ±15 %, and 150 pairs pin the median to about ±1 %.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from _common import BENCH_MODEL, build, rank0, summary, time_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1, help="steps per block")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--family",
        default=None,
        choices=["mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "deepseek_v2_lite"],
        help="append this Megatron-LM family's model flags",
    )
    args, rest = parser.parse_known_args()

    import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_wsm.batches import global_batch_iterator
    from megatron_wsm.moe_metrics import ExpertLoadCallback
    from megatron_wsm.training import _loss_func, device, train_step

    family: list[str] = []
    if args.family:
        from megatron_wsm.testing.families import REFERENCE_FAMILIES

        family = list(REFERENCE_FAMILIES[args.family])
    comp, _ = build([*BENCH_MODEL, *family, *rest])
    cfg = comp.cfg
    nmb = comp.num_microbatches
    batches = list(
        global_batch_iterator(
            comp.datasets["train"],
            0,
            cfg.training.micro_batch_size,
            ps.get_data_parallel_world_size(),
            ps.get_data_parallel_rank(),
            nmb,
            device(),
        )
    )

    def bare_forward(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return out, partial(_loss_func, batch["loss_mask"])

    forward_backward = get_forward_backward_func()

    def bare_step() -> None:
        for chunk in comp.model:
            chunk.zero_grad_buffer()
        comp.optimizer.zero_grad()
        forward_backward(
            forward_step_func=bare_forward,
            data_iterator=iter(batches),
            model=comp.model,
            num_microbatches=nmb,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            decoder_seq_length=cfg.model.seq_length,
            forward_only=False,
        )
        comp.optimizer.step()
        comp.scheduler.step(increment=cfg.training.global_batch_size)

    expert_counts = ExpertLoadCallback()

    def our_step() -> None:
        expert_counts.after_step(comp, train_step(comp))

    for _ in range(3):  # warm-up both paths
        bare_step()
        our_step()
    times = time_blocks(
        {"bare_megatron_core": bare_step, "megatron_wsm": our_step}, args.steps, args.rounds
    )
    result = summary(times, "bare_megatron_core")
    tokens = comp.tokens_per_iteration
    if rank0():
        print(
            f"model: {comp.cfg.model.num_layers} layers, hidden {comp.cfg.model.hidden_size}, "
            f"{comp.cfg.model.num_experts} experts; {tokens} tokens/iteration"
        )
        for name, r in result.items():
            print(
                f"{name:20s} {r['median_s'] * 1000:8.1f} ms/it  {tokens / r['median_s']:10.0f} "
                f"tok/s"
            )
        ours = result["megatron_wsm"]
        # Throughput is the inverse of time: the time ratio's upper bound is the throughput
        # ratio's lower one.
        ratio, low, high = 1.0 / ours["ratio"], 1.0 / ours["ratio_high"], 1.0 / ours["ratio_low"]
        print(
            f"throughput ratio megatron_wsm / bare megatron-core = {ratio:.3f} (goal >= 0.98)"
            f"  [95% CI {low:.3f}-{high:.3f}, {args.rounds} paired rounds]"
            + (f" [family {args.family}]" if args.family else "")
        )
        if args.json:
            record = {"throughput_ratio": ratio, "ci95": [low, high], "family": args.family}
            with open(args.json, "w") as f:
                json.dump({**record, **result}, f, indent=2)


if __name__ == "__main__":
    main()
