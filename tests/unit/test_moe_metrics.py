"""Unit tests of megatron_wsm.moe_metrics: arithmetic, names, and the hook on a real TopKRouter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from megatron_wsm import moe_metrics as mm
from megatron_wsm.testing.router import patch_router_for_cpu

# ---------------------------------------------------------------------------------------------
# Pure arithmetic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "max_v", "min_v"),
    [
        ([4, 2, 2, 0], 1.0, 1.0),  # mean 2
        ([3, 1], 0.5, 0.5),  # mean 2
        ([6, 3, 3, 3, 0, 3], 1.0, 1.0),  # mean 3, one expert starved
        ([5, 1, 0], 1.5, 1.0),  # mean 2: max (5-2)/2, min (2-0)/2
        ([5, 5, 5], 0.0, 0.0),  # perfectly even
        ([0, 0, 0, 0], 0.0, 0.0),  # no tokens at all: defined as 0.0
        ([7], 0.0, 0.0),  # a single expert is always balanced
        ([9, 0, 0], 2.0, 1.0),  # everything on one expert: max = E-1, min = 1
    ],
)
def test_hand_computed_violations(load: list[int], max_v: float, min_v: float) -> None:
    t = torch.tensor(load, dtype=torch.int64)
    assert mm.max_violation(t) == pytest.approx(max_v, abs=0, rel=1e-15)
    assert mm.min_violation(t) == pytest.approx(min_v, abs=0, rel=1e-15)


def test_vectorised_matches_scalar_and_dtype() -> None:
    counts = torch.tensor([[4, 2, 2, 0], [5, 5, 5, 5], [0, 0, 0, 0], [1, 2, 3, 6]])
    max_v, min_v = mm.violations(counts)
    assert max_v.dtype == torch.float64 and min_v.dtype == torch.float64
    assert max_v.shape == (4,) and min_v.shape == (4,)
    for row, a, b in zip(counts, max_v.tolist(), min_v.tolist(), strict=True):
        assert a == mm.max_violation(row)
        assert b == mm.min_violation(row)
    assert max_v.tolist() == [1.0, 0.0, 0.0, 1.0]  # [1,2,3,6]: mean 3 -> (6-3)/3
    assert min_v.tolist() == [1.0, 0.0, 0.0, 2.0 / 3.0]


def test_violation_input_checks() -> None:
    with pytest.raises(ValueError):
        mm.max_violation(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError):
        mm.min_violation(torch.tensor([1, -1]))
    with pytest.raises(ValueError):
        mm.violations(torch.zeros(3, 0))


@settings(deadline=None, max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=64))
def test_property_nonnegative_and_zero_iff_even(load: list[int]) -> None:
    t = torch.tensor(load, dtype=torch.int64)
    max_v, min_v = mm.max_violation(t), mm.min_violation(t)
    even = len(set(load)) == 1
    assert max_v >= 0.0 and min_v >= 0.0
    assert (max_v == 0.0) == even
    assert (min_v == 0.0) == even
    # Bounds: the min violation never exceeds 1 (an empty expert), the max never E-1.
    assert min_v <= 1.0 + 1e-12
    assert max_v <= len(load) - 1 + 1e-9


@settings(deadline=None, max_examples=100)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda e: st.lists(
            st.lists(st.integers(0, 1000), min_size=e, max_size=e), min_size=1, max_size=5
        )
    )
)
def test_property_vectorised_equals_rowwise(rows: list[list[int]]) -> None:
    counts = torch.tensor(rows, dtype=torch.int64)
    max_v, min_v = mm.violations(counts)
    assert max_v.tolist() == [mm.max_violation(r) for r in counts]
    assert min_v.tolist() == [mm.min_violation(r) for r in counts]


# ---------------------------------------------------------------------------------------------
# Names and summaries
# ---------------------------------------------------------------------------------------------


def test_metric_names_are_the_issue_names() -> None:
    assert mm.global_max_violation_tag(3) == "moe/global_max_violation/layer_2"
    assert mm.global_min_violation_tag(12) == "moe/global_min_violation/layer_11"
    assert mm.MEAN_GLOBAL_MAX_VIOLATION == "moe/mean_global_max_violation"
    assert mm.MEAN_GLOBAL_MIN_VIOLATION == "moe/mean_global_min_violation"
    assert mm.MEAN_BATCH_MAX_VIOLATION == "moe/mean_batch_max_violation"
    assert mm.MEAN_BATCH_MIN_VIOLATION == "moe/mean_batch_min_violation"
    assert mm.expert_load_tag(1) == "moe/expert_load/layer_0"


def test_per_layer_tags_count_from_zero_like_megatron_core() -> None:
    from megatron.core.transformer.moe import moe_utils

    # megatron-core keeps layer_number n (1-based) in row n-1 of its tracker and tags row i
    # ``moe/<name>_layer_{i}``: our tag for the same layer must carry the same i.
    try:
        moe_utils.save_to_aux_losses_tracker("probe", torch.tensor(5.0), 2, 3)
        rows = moe_utils.get_moe_layer_wise_logging_tracker()["probe"]["values"].tolist()
    finally:
        moe_utils.get_moe_layer_wise_logging_tracker().pop("probe", None)
    mcore_index = rows.index(5.0)
    assert mm.global_max_violation_tag(2).endswith(f"/layer_{mcore_index}")
    assert mm.global_min_violation_tag(2).endswith(f"/layer_{mcore_index}")
    assert mm.expert_load_tag(2).endswith(f"/layer_{mcore_index}")
    with pytest.raises(ValueError, match="1-based"):
        mm.expert_load_tag(0)


def test_format_console() -> None:
    metrics = {mm.MEAN_GLOBAL_MAX_VIOLATION: 0.545, mm.MEAN_GLOBAL_MIN_VIOLATION: 0.201}
    assert mm.format_console(metrics) == " moe max vio: 0.5450 | moe min vio: 0.2010 |"
    assert mm.format_console({}) == ""


def test_moe_layer_numbers() -> None:
    assert mm.moe_layer_numbers(4, 1) == [1, 2, 3, 4]
    assert mm.moe_layer_numbers(5, 2) == [1, 3, 5]
    assert mm.moe_layer_numbers(4, [0, 1, 1, 0]) == [2, 3]
    with pytest.raises(ValueError):
        mm.moe_layer_numbers(3, [1, 0])
    with pytest.raises(ValueError):
        mm.moe_layer_numbers(3, 0)


def test_summarize_excludes_dense_layers() -> None:
    # 4 layers, layers 2 and 4 dense (zero rows).
    counts = torch.tensor([[4, 2, 2, 0], [0, 0, 0, 0], [3, 3, 3, 3], [0, 0, 0, 0]])
    out = mm.summarize(counts)
    assert out == {
        "moe/global_max_violation/layer_0": 1.0,
        "moe/global_min_violation/layer_0": 1.0,
        "moe/global_max_violation/layer_2": 0.0,
        "moe/global_min_violation/layer_2": 0.0,
        "moe/mean_global_max_violation": 0.5,
        "moe/mean_global_min_violation": 0.5,
    }
    # Explicit layers: the same when they match, and a given zero row counts as 0.0.
    assert mm.summarize(counts, [1, 3]) == out
    explicit = mm.summarize(counts, [1, 2, 3])
    assert explicit["moe/global_max_violation/layer_1"] == 0.0
    assert explicit["moe/mean_global_max_violation"] == pytest.approx(1.0 / 3.0)
    assert mm.summarize(torch.zeros(2, 4, dtype=torch.int64)) == {}
    with pytest.raises(ValueError):
        mm.summarize(counts, [0])  # layers are 1-based
    with pytest.raises(ValueError):
        mm.summarize(counts, [5])


def test_eval_summary_and_histograms_are_serialisable() -> None:
    counts = torch.tensor([[4, 2, 2, 0], [0, 0, 0, 0], [1, 2, 3, 6]])
    res = mm.eval_summary(counts)
    assert res["moe_layers"] == [1, 3]
    assert res["global_max_violation"] == {"1": 1.0, "3": 1.0}
    assert res["global_min_violation"] == {"1": 1.0, "3": pytest.approx(2.0 / 3.0)}
    assert res["mean_global_max_violation"] == 1.0
    assert res["mean_global_min_violation"] == pytest.approx((1.0 + 2.0 / 3.0) / 2)
    assert res["expert_load"] == {"1": [4, 2, 2, 0], "3": [1, 2, 3, 6]}
    assert json.loads(json.dumps(res)) == res
    empty = mm.eval_summary(torch.zeros(2, 3, dtype=torch.int64))
    assert empty["mean_global_max_violation"] is None and empty["moe_layers"] == []
    hist = mm.histograms(counts)
    assert list(hist) == ["moe/expert_load/layer_0", "moe/expert_load/layer_2"]
    assert hist["moe/expert_load/layer_2"].tolist() == [1, 2, 3, 6]


def test_batch_accumulator_averages_ratios_not_counts() -> None:
    acc = mm.BatchViolationAccumulator(2)
    assert acc.summary() == {}
    # Layer 1: batch A [4,0] -> max 1, min 1; batch B [2,2] -> 0, 0. Layer 2 dense.
    acc.add(torch.tensor([[4, 0], [0, 0]]))
    acc.add(torch.tensor([[2, 2], [0, 0]]))
    assert acc.num_batches == 2
    assert acc.summary() == {
        "moe/mean_batch_max_violation": 0.5,
        "moe/mean_batch_min_violation": 0.5,
    }
    # The mean of per-batch ratios is not the ratio of the summed counts:
    acc.reset()
    acc.add(torch.tensor([[3, 1, 0], [0, 0, 0]]))  # mean 4/3: max 1.25, min 1
    acc.add(torch.tensor([[0, 1, 3], [0, 0, 0]]))  # same
    batch = acc.summary()
    glob = mm.summarize(torch.tensor([[3, 2, 3], [0, 0, 0]]))  # mean 8/3: max 1/8, min 1/4
    assert batch[mm.MEAN_BATCH_MAX_VIOLATION] == pytest.approx(1.25)
    assert batch[mm.MEAN_BATCH_MIN_VIOLATION] == pytest.approx(1.0)
    assert glob[mm.MEAN_GLOBAL_MAX_VIOLATION] == pytest.approx(0.125)
    assert glob[mm.MEAN_GLOBAL_MIN_VIOLATION] == pytest.approx(0.25)


def test_reduce_fn_for_config_binds_tp_and_sp() -> None:
    class Cfg:
        tensor_model_parallel_size = 4
        sequence_parallel = True

    fn = mm.reduce_fn_for_config(Cfg())
    assert fn.func is mm.reduce_counts
    assert fn.keywords == {"group": None, "tp_size": 4, "sequence_parallel": True}


# ---------------------------------------------------------------------------------------------
# A real megatron-core TopKRouter on CPU
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_router(megatron_world, monkeypatch: pytest.MonkeyPatch):
    """Factory of TopKRouters whose logits equal the input (weight = identity)."""
    patch_router_for_cpu(monkeypatch)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    def make(num_experts: int, topk: int, layer_number: int | None, **cfg_kw) -> TopKRouter:
        config = TransformerConfig(
            num_layers=4,
            hidden_size=num_experts,
            num_attention_heads=1,
            num_moe_experts=num_experts,
            moe_router_topk=topk,
            use_cpu_initialization=True,
            # megatron-core refuses top-1 without pre-softmax (softmax over one logit is 1).
            moe_router_pre_softmax=topk == 1,
            **cfg_kw,
        )
        router = TopKRouter(config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        with torch.no_grad():
            router.weight.copy_(torch.eye(num_experts))
        if layer_number is not None:
            router.set_layer_number(layer_number)
        return router

    return make


def crafted_tokens(choices: list[tuple[int, ...]], num_experts: int) -> torch.Tensor:
    """Hidden states [s, b=1, h=E] whose logits (identity router) pick ``choices`` per token."""
    x = torch.zeros(len(choices), 1, num_experts)
    for t, experts in enumerate(choices):
        for rank, e in enumerate(experts):
            x[t, 0, e] = 10.0 - 3.0 * rank  # distinct, well separated: no ties
    return x


def expected_counts(choices: list[tuple[int, ...]], num_experts: int) -> list[int]:
    out = [0] * num_experts
    for experts in choices:
        for e in experts:
            out[e] += 1
    return out


class ToyModel(torch.nn.Module):
    """Routers at given global layer numbers, to stand in for a GPTModel chunk."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(routers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for router in self.layers:
            probs, _ = router(x)
            out = out * probs.sum(-1).reshape(x.shape[0], x.shape[1], 1)
        return out


TOP1_UNEVEN = [(0,), (0,), (0,), (1,), (2,), (2,)]  # expert 3 receives nothing
TOP2_UNEVEN = [(0, 1), (0, 2), (1, 0), (2, 0), (0, 1)]
TOP2_EVEN = [(0, 1), (2, 3), (1, 2), (3, 0)]


@pytest.mark.parametrize(
    ("topk", "choices", "max_v", "min_v"),
    [
        # counts [3,1,2,0], mean 1.5
        (1, TOP1_UNEVEN, 1.0, 1.0),
        # counts [5,3,2,0], mean 2.5: max 1.0, min 1.0
        (2, TOP2_UNEVEN, 1.0, 1.0),
        # counts [2,2,2,2]
        (2, TOP2_EVEN, 0.0, 0.0),
    ],
)
def test_real_router_counts(cpu_router, topk, choices, max_v, min_v) -> None:
    router = cpu_router(4, topk, layer_number=2)
    tracker = mm.ExpertLoadTracker()
    assert tracker.attach(router, num_layers=3, num_experts=4, topk=topk) == [2]
    _, routing_map = router(crafted_tokens(choices, 4))
    # The router output format the hook relies on.
    assert routing_map.dtype == torch.bool and routing_map.shape == (len(choices), 4)
    counts = tracker.local_counts()
    assert counts.dtype == torch.int64 and counts.shape == (3, 4)
    assert counts[1].tolist() == expected_counts(choices, 4)
    assert counts[0].tolist() == [0] * 4 and counts[2].tolist() == [0] * 4
    assert int(counts.sum()) == topk * len(choices)
    summary = mm.summarize(tracker.end_batch())
    assert summary[mm.global_max_violation_tag(2)] == max_v
    assert summary[mm.global_min_violation_tag(2)] == min_v


def test_layers_micro_batches_intervals(cpu_router) -> None:
    # Layers 1 and 3 are MoE, 2 and 4 dense (moe_layer_freq=2), inside a wrapper module.
    model = ToyModel([cpu_router(4, 1, layer_number=1), cpu_router(4, 1, layer_number=3)])
    tracker = mm.ExpertLoadTracker()
    assert tracker.attach([model], num_layers=4, num_experts=4, topk=1) == [1, 3]
    # Global batch 1 = two micro-batches; each token counted once per MoE layer.
    model(crafted_tokens([(0,), (0,), (1,)], 4))
    model(crafted_tokens([(0,), (2,), (3,)], 4))
    b1 = tracker.end_batch(lambda c: c.clone())
    assert b1[0].tolist() == [3, 1, 1, 1] and b1[2].tolist() == [3, 1, 1, 1]
    assert b1[1].tolist() == [0] * 4 and b1[3].tolist() == [0] * 4
    assert tracker.local_counts().sum() == 0  # the batch accumulator was emptied
    # Global batch 2: perfectly even.
    model(crafted_tokens([(1,), (2,), (3,), (0,)], 4))
    tracker.end_batch()
    assert tracker.num_batches == 2
    assert tracker.interval_counts()[0].tolist() == [4, 2, 2, 2]
    metrics = tracker.interval_metrics()
    # Global: [4,2,2,2] mean 2.5 -> max 0.6, min 0.2.
    # Batch: [3,1,1,1] mean 1.5 -> max 1.0, min 1/3; the even batch -> 0, 0.
    assert metrics[mm.global_max_violation_tag(1)] == pytest.approx(0.6)
    assert metrics[mm.global_min_violation_tag(3)] == pytest.approx(0.2)
    assert metrics[mm.MEAN_GLOBAL_MAX_VIOLATION] == pytest.approx(0.6)
    assert metrics[mm.MEAN_GLOBAL_MIN_VIOLATION] == pytest.approx(0.2)
    assert metrics[mm.MEAN_BATCH_MAX_VIOLATION] == pytest.approx(0.5)
    assert metrics[mm.MEAN_BATCH_MIN_VIOLATION] == pytest.approx(1.0 / 6.0)
    assert mm.global_max_violation_tag(2) not in metrics  # dense layer
    assert metrics == {
        **mm.summarize(tracker.interval_counts(), [1, 3]),
        **{k: metrics[k] for k in (mm.MEAN_BATCH_MAX_VIOLATION, mm.MEAN_BATCH_MIN_VIOLATION)},
    }
    assert list(tracker.interval_histograms()) == [
        "moe/expert_load/layer_0",
        "moe/expert_load/layer_2",
    ]
    tracker.reset_interval()
    assert tracker.interval_metrics() == {} and tracker.interval_counts().sum() == 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_recompute_is_not_double_counted(cpu_router, use_reentrant: bool) -> None:
    router = cpu_router(4, 2, layer_number=1)
    model = ToyModel([router])
    calls: list[bool] = []
    router.register_forward_hook(lambda m, a, o: calls.append(True))
    tracker = mm.ExpertLoadTracker()
    tracker.attach(model, num_layers=1, num_experts=4, topk=2)
    x = crafted_tokens(TOP2_UNEVEN, 4).requires_grad_(True)
    # Early stop off: non-reentrant checkpointing must re-run the whole region, router included.
    with set_checkpoint_early_stop(False):
        out = checkpoint(model, x, use_reentrant=use_reentrant)
        out.sum().backward()
    assert len(calls) == 2, "the router should have run twice (forward + recompute)"
    assert x.grad is not None
    assert tracker.local_counts()[0].tolist() == expected_counts(TOP2_UNEVEN, 4)


def test_eval_forwards_are_counted_apart(cpu_router) -> None:
    router = cpu_router(4, 1, layer_number=1)
    tracker = mm.ExpertLoadTracker()
    tracker.attach(router, num_layers=1, num_experts=4, topk=1)
    # Training-mode forward under no_grad (as in megatron's full recompute): counted once.
    with torch.no_grad():
        router(crafted_tokens([(0,), (1,)], 4))
    assert tracker.local_counts()[0].tolist() == [1, 1, 0, 0]
    # model.eval() forward outside evaluating(): ignored.
    router.eval()
    with torch.no_grad():
        router(crafted_tokens([(3,)], 4))
    assert tracker.local_counts()[0].tolist() == [1, 1, 0, 0]
    # Inside evaluating(): counted into the eval accumulator only.
    with tracker.evaluating():
        with torch.no_grad():
            router(crafted_tokens([(3,), (3,), (2,)], 4))
        assert tracker.local_counts()[0].tolist() == [0, 0, 1, 2]
    eval_counts = tracker.eval_counts()
    assert eval_counts[0].tolist() == [0, 0, 1, 2]
    # [0,0,1,2]: mean 0.75 -> max (2-0.75)/0.75, min 1.
    res = mm.eval_summary(eval_counts)
    assert res["global_max_violation"] == {"1": pytest.approx(5.0 / 3.0)}
    assert res["global_min_violation"] == {"1": 1.0}
    router.train()
    assert tracker.local_counts()[0].tolist() == [1, 1, 0, 0]
    # A second evaluation starts from zero.
    with tracker.evaluating():
        pass
    assert tracker.eval_counts().sum() == 0
    tracker.reset()
    assert tracker.local_counts().sum() == 0


def test_padding_tokens_are_not_counted(cpu_router) -> None:
    router = cpu_router(4, 1, layer_number=1)
    tracker = mm.ExpertLoadTracker()
    tracker.attach(router, num_layers=1, num_experts=4, topk=1)
    x = crafted_tokens([(0,), (1,), (2,), (3,)], 4)  # [s=4, b=1, h]
    padding = torch.tensor([[False], [False], [True], [True]])  # [s, b], True = padding
    router(x, padding)
    assert tracker.local_counts()[0].tolist() == [1, 1, 0, 0]
    router(x, padding_mask=padding)
    assert tracker.local_counts()[0].tolist() == [2, 2, 0, 0]


def test_attach_checks_and_detach(cpu_router) -> None:
    tracker = mm.ExpertLoadTracker()
    with pytest.raises(ValueError, match="layer_number"):
        tracker.attach(cpu_router(4, 1, layer_number=None), num_layers=2, num_experts=4, topk=1)
    with pytest.raises(ValueError, match="two routers"):
        tracker.attach(
            ToyModel([cpu_router(4, 1, layer_number=1), cpu_router(4, 1, layer_number=1)]),
            num_layers=2,
            num_experts=4,
            topk=1,
        )
    with pytest.raises(ValueError, match="topk"):
        tracker.attach(cpu_router(4, 2, layer_number=1), num_layers=2, num_experts=4, topk=1)
    with pytest.raises(ValueError, match="experts"):
        tracker.attach(cpu_router(4, 1, layer_number=1), num_layers=2, num_experts=8, topk=1)
    # An MTP router is numbered after the decoder layers: skipped with a warning.
    model = ToyModel([cpu_router(4, 1, layer_number=2), cpu_router(4, 1, layer_number=3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.attach(model, num_layers=2, num_experts=4, topk=1) == [2]
    assert any("layer 3 > 2" in str(w.message) for w in caught)
    with pytest.raises(RuntimeError):
        tracker.attach(model, num_layers=2, num_experts=4, topk=1)
    model(crafted_tokens([(1,)], 4))
    assert tracker.local_counts()[1].tolist() == [0, 1, 0, 0]
    tracker.detach()
    model(crafted_tokens([(1,)], 4))
    assert tracker.local_counts()[1].tolist() == [0, 1, 0, 0]


def test_for_model_default_reduction_eval_and_histograms(cpu_router) -> None:
    router = cpu_router(4, 2, layer_number=3)
    model = ToyModel([router])
    tracker = mm.ExpertLoadTracker.for_model(model, router.config)
    assert (tracker.num_layers, tracker.num_experts, tracker.topk) == (4, 4, 2)
    assert tracker.local_moe_layers == [3]
    # torch.distributed is initialised (world of 1): the default reduction is the world sum.
    assert tracker.reduce_fn.func is mm.reduce_counts
    assert tracker.reduce_fn.keywords["tp_size"] == 1
    model(crafted_tokens(TOP2_UNEVEN, 4))
    tracker.end_batch()
    assert tracker.interval_counts()[2].tolist() == [5, 3, 2, 0]

    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[int], int]] = []

        def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
            self.calls.append((tag, values.tolist(), step))

    writer = Writer()
    tracker.write_histograms(writer, 7)
    assert writer.calls == [("moe/expert_load/layer_2", [5, 3, 2, 0], 7)]
    # begin_eval / end_eval, as a trainer's evaluate() would use them.
    model.eval()
    tracker.begin_eval()
    with torch.no_grad():
        model(crafted_tokens(TOP2_EVEN, 4))
    res = tracker.end_eval()
    model.train()
    assert res["moe_layers"] == [3]
    assert res["expert_load"] == {"3": [2, 2, 2, 2]}
    assert res["mean_global_max_violation"] == 0.0
    assert res["mean_global_min_violation"] == 0.0
    # The training interval was not touched by the evaluation.
    assert tracker.interval_counts()[2].tolist() == [5, 3, 2, 0]
    model(crafted_tokens(TOP2_EVEN, 4))  # back in training: counted as training again
    assert tracker.local_counts()[2].tolist() == [2, 2, 2, 2]


def test_reduce_counts_single_process(megatron_world) -> None:
    counts = torch.tensor([[1, 2], [3, 4]])
    out = mm.reduce_counts(counts)
    assert out.tolist() == counts.tolist() and out is not counts
    assert math.isclose(mm.summarize(out)[mm.MEAN_GLOBAL_MAX_VIOLATION], (1 / 3 + 1 / 7) / 2)
    with pytest.raises(ValueError):
        mm.reduce_counts(counts, tp_size=0)


# ---------------------------------------------------------------------------------------------
# megatron-core's own activation recomputation, through a real GPTModel
# ---------------------------------------------------------------------------------------------

_GPT_RECOMPUTE_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, warnings
    warnings.filterwarnings("ignore")
    import torch, torch.distributed as dist
    from megatron_wsm import cpu_compat
    cpu_compat.apply()
    import megatron.core.tensor_parallel.random as mrandom

    # CPU-only shim for megatron's CheckpointFunction (not in cpu_compat as of writing): it
    # saves/restores the CUDA generator state around the recompute. On CPU the CPU generator
    # and the RNG tracker states, which it also saves, are all there is.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method="file://" + tempfile.mktemp()
    )
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel()
    mrandom.model_parallel_cuda_manual_seed(1)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import Router
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_wsm import moe_metrics as mm

    modes = {
        "none": {},
        "full": dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        ),
        "selective_moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    }
    out = {}
    for mode, kw in modes.items():
        torch.manual_seed(0)
        mrandom.get_cuda_rng_tracker().reset()
        mrandom.model_parallel_cuda_manual_seed(1)
        cfg = TransformerConfig(
            num_layers=4, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
            num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[1, 0, 1, 1],
            moe_token_dispatcher_type="alltoall", add_bias_linear=False,
            use_cpu_initialization=True, **kw,
        )
        spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
        model = GPTModel(cfg, spec, vocab_size=64, max_sequence_length=8)
        tracker = mm.ExpertLoadTracker.for_model(model, cfg)
        calls = []
        for m in model.modules():
            if isinstance(m, Router):
                m.register_forward_hook(lambda *a: calls.append(1))
        ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(5))
        pos = torch.arange(8).expand(3, 8)
        model(ids, pos, None, labels=ids).sum().backward()
        counts = tracker.end_batch()
        out[mode] = dict(
            calls=len(calls), layers=tracker.local_moe_layers,
            row_sums=counts.sum(1).tolist(), counts=counts.tolist(),
            metrics=tracker.interval_metrics(),
        )
    print("RESULT " + json.dumps(out))
    """
)


def test_megatron_recompute_counts_each_token_once(tmp_path: Path) -> None:
    """GPTModel (local spec, moe_layer_freq=[1,0,1,1]) with megatron's full and selective "moe"
    recompute: the routers run twice, every token is counted once, numbers match no recompute.

    Runs in a subprocess because cpu_compat patches torch process-wide.
    """
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", _GPT_RECOMPUTE_SCRIPT],
        check=False,  # the assertion below shows the output on failure
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    tokens = 3 * 8
    for mode, r in res.items():
        assert r["layers"] == [1, 3, 4], (mode, r)  # global layer numbers, dense layer 2 skipped
        assert r["row_sums"] == [2 * tokens, 0, 2 * tokens, 2 * tokens], (mode, r)
        assert r["counts"] == res["none"]["counts"], mode
        assert r["metrics"] == res["none"]["metrics"], mode
    assert res["none"]["calls"] == 3
    assert res["full"]["calls"] == 6  # forward + recompute in backward
    assert res["selective_moe"]["calls"] == 6
