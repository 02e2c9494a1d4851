"""Distributed tests (gloo, 2 processes) of megatron_wsm.moe_metrics.reduce_counts and the tracker.

Each parallel layout routes the same global data through real megatron-core TopKRouters, split
the way that layout splits tokens, and must give the same global counts and violations as the
single-process reference (computed by hand from the crafted routing choices).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_wsm import moe_metrics as mm
from megatron_wsm.testing.router import patch_router_for_cpu

pytestmark = pytest.mark.distributed

WORLD = 2
NUM_LAYERS = 2
NUM_EXPERTS = 4
TOPK = 2
SEQ = 8
MICRO_BATCH = 2  # sequences per micro-batch (global over DP)
MICRO_BATCHES = 2  # per global batch
GLOBAL_BATCHES = 2


SPAWN_DEADLINE_S = 600


def _init_world(rank: int, init_file: str) -> None:
    # A file store, not a TCP port, so concurrent test runs cannot collide; a collective timeout
    # so a scenario that desynchronises the ranks fails instead of hanging.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )


# ---------------------------------------------------------------------------------------------
# reduce_counts semantics
# ---------------------------------------------------------------------------------------------


def _reduce_semantics(rank: int) -> None:
    """World-sum rules of reduce_counts, on hand-made counts (no megatron needed)."""
    # DP / CP / EP: ranks see different tokens -> plain sum.
    local = torch.tensor([[rank + 1, 2 * rank, 0], [0, 5, 1]], dtype=torch.int64)
    before = local.clone()
    out = mm.reduce_counts(local)
    assert out.dtype == torch.int64
    assert out.tolist() == [[3, 2, 0], [0, 10, 2]], out
    assert torch.equal(local, before), "input must not be modified"
    # TP with sequence parallelism: each TP rank routes its own sequence shard -> sum.
    out = mm.reduce_counts(local, tp_size=2, sequence_parallel=True)
    assert out.tolist() == [[3, 2, 0], [0, 10, 2]], out
    # TP without sequence parallelism: both TP ranks routed the same tokens -> sum / tp.
    same = torch.tensor([[7, 1, 0], [2, 3, 3]], dtype=torch.int64)
    out = mm.reduce_counts(same, tp_size=2, sequence_parallel=False)
    assert out.tolist() == same.tolist(), out
    # PP: each stage fills only its own layer rows -> the sum gathers the layers.
    stage = torch.zeros(2, 3, dtype=torch.int64)
    stage[rank] = torch.tensor([4, 2, 0]) if rank == 0 else torch.tensor([1, 1, 1])
    out = mm.reduce_counts(stage)
    assert out.tolist() == [[4, 2, 0], [1, 1, 1]], out
    # Explicit group.
    out = mm.reduce_counts(local, group=dist.new_group([0, 1]))
    assert out.tolist() == [[3, 2, 0], [0, 10, 2]], out


# ---------------------------------------------------------------------------------------------
# End to end through real routers under several layouts
# ---------------------------------------------------------------------------------------------


def _choices() -> list[list[list[list[tuple[int, int]]]]]:
    """choices[g][m][layer][token]: the (first, second) expert of each token, token = s*B + b."""
    rng = random.Random(1234)
    # Skewed so the violations are far from zero and differ between layers and batches.
    weights = [[6, 3, 1, 0.5], [1, 1, 4, 2]]
    out = []
    for _ in range(GLOBAL_BATCHES):
        batch = []
        for _ in range(MICRO_BATCHES):
            layers = []
            for layer in range(NUM_LAYERS):
                toks = []
                for _ in range(SEQ * MICRO_BATCH):
                    first = rng.choices(range(NUM_EXPERTS), weights=weights[layer])[0]
                    second = rng.choice([e for e in range(NUM_EXPERTS) if e != first])
                    toks.append((first, second))
                layers.append(toks)
            batch.append(layers)
        out.append(batch)
    return out


def _hidden(tokens: list[tuple[int, int]]) -> torch.Tensor:
    """[s, b, h=E] hidden states whose logits (identity router) select ``tokens``."""
    x = torch.zeros(SEQ * MICRO_BATCH, NUM_EXPERTS)
    for t, (first, second) in enumerate(tokens):
        x[t, first] = 10.0
        x[t, second] = 7.0
    return x.view(SEQ, MICRO_BATCH, NUM_EXPERTS)


def _reference() -> tuple[torch.Tensor, dict[str, float]]:
    """Single-process truth: global interval counts and interval metrics."""
    acc = mm.BatchViolationAccumulator(NUM_LAYERS)
    total = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
    for batch in _choices():
        counts = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
        for micro in batch:
            for layer, toks in enumerate(micro):
                for pair in toks:
                    for e in pair:
                        counts[layer, e] += 1
        acc.add(counts)
        total += counts
    metrics = mm.summarize(total)
    metrics.update(acc.summary())
    return total, metrics


LAYOUTS = {
    # name: (tp, pp, ep, sequence_parallel)
    "dp2": (1, 1, 1, False),
    "ep2": (1, 1, 2, False),
    "tp2_sp": (2, 1, 1, True),
    "tp2_nosp": (2, 1, 1, False),
    "pp2": (1, 2, 1, False),
}


def _layout(rank: int, layout: str) -> None:
    tp, pp, ep, sp = LAYOUTS[layout]
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    patch_router_for_cpu()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    try:
        config = TransformerConfig(
            num_layers=NUM_LAYERS,
            hidden_size=NUM_EXPERTS,
            num_attention_heads=2,
            num_moe_experts=NUM_EXPERTS,
            moe_router_topk=TOPK,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            sequence_parallel=sp,
            pipeline_dtype=torch.float32 if pp > 1 else None,
            add_bias_linear=False,  # MoE biases require expert-TP 1; irrelevant to routing
            use_cpu_initialization=True,
        )
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        tp_rank = ps.get_tensor_model_parallel_rank()
        dp_rank = ps.get_data_parallel_rank()
        dp_size = ps.get_data_parallel_world_size()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        # Which global layers this rank owns: PP splits the layers, other layouts keep all.
        owned = [pp_rank + 1] if pp > 1 else list(range(1, NUM_LAYERS + 1))
        routers = torch.nn.ModuleDict()
        for layer in owned:
            router = TopKRouter(config, pg_collection=pgs)
            with torch.no_grad():
                router.weight.copy_(torch.eye(NUM_EXPERTS))
            router.set_layer_number(layer)  # global, as TransformerLayer would set it
            routers[f"layer{layer}"] = router
        # Default reduction: derived from the config (world sum, TP division without SP).
        tracker = mm.ExpertLoadTracker.for_model(routers, config)
        assert tracker.local_moe_layers == owned
        per_dp = MICRO_BATCH // dp_size
        per_tp = SEQ // tp

        def run_global_batch(batch: list) -> None:
            for micro in batch:
                for layer in owned:
                    x = _hidden(micro[layer - 1])
                    # DP (and EP, carved from DP) ranks take different sequences.
                    x = x[:, dp_rank * per_dp : (dp_rank + 1) * per_dp]
                    if sp:
                        # Sequence parallel: each TP rank routes its own sequence shard.
                        x = x[tp_rank * per_tp : (tp_rank + 1) * per_tp]
                    routers[f"layer{layer}"](x)

        for batch in _choices():
            run_global_batch(batch)
            tracker.end_batch()
        total, metrics = _reference()
        assert torch.equal(tracker.interval_counts(), total), (tracker.interval_counts(), total)
        got = tracker.interval_metrics()
        assert got == metrics, (layout, got, metrics)
        assert all(v > 0 for v in got.values()), got
        # Evaluation over the whole "set" (all global batches): same global counts.
        routers.eval()
        tracker.begin_eval()
        with torch.no_grad():
            for batch in _choices():
                run_global_batch(batch)
        result = tracker.end_eval()
        assert result == mm.eval_summary(total), (layout, result)
    finally:
        ps.destroy_model_parallel()


# ---------------------------------------------------------------------------------------------
# One spawn for all scenarios (importing megatron-core costs seconds per process), one test each
# ---------------------------------------------------------------------------------------------


def _scenarios() -> dict[str, Callable[[int], None]]:
    out: dict[str, Callable[[int], None]] = {"reduce_semantics": _reduce_semantics}
    for name in sorted(LAYOUTS):
        out[name] = lambda rank, name=name: _layout(rank, name)
    return out


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    _init_world(rank, init_file)
    results: dict[str, str] = {}
    try:
        for name, scenario in _scenarios().items():
            try:
                scenario(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - report every scenario, not just the first failure
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Run every scenario in one 2-process gloo world; per-rank {scenario: "ok" | traceback}."""
    tmp = tmp_path_factory.mktemp("moe_metrics_dist")
    ctx = mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed scenarios did not finish in {SPAWN_DEADLINE_S} s")
    results = []
    for rank in range(WORLD):
        with open(tmp / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("scenario", list(_scenarios()))
def test_scenario(scenario_results: list[dict[str, str]], scenario: str) -> None:
    """reduce_semantics: world-sum / TP-division rules; others: layout == 1-process truth."""
    for rank, results in enumerate(scenario_results):
        assert results.get(scenario) == "ok", f"rank {rank}, {scenario}:\n{results.get(scenario)}"
