"""Distributed-optimizer checkpoint policy and the CPU optimizer type-name shim (pure parts)."""

from __future__ import annotations

import pytest
import torch

from megatron_wsm.checkpoint.manifest import ParallelLayout
from megatron_wsm.checkpoint.optimizer_state import (
    optimizer_load_problem,
    optimizer_record,
    optimizer_sharding_metadata,
)
from megatron_wsm.cpu_compat import cuda_type_name, cuda_type_names


def test_sharding_metadata_is_explicit_for_the_distributed_optimizer():
    assert optimizer_sharding_metadata(None) == {}  # plain optimizer: today's keys
    assert optimizer_sharding_metadata("dp_reshardable") == {
        "distrib_optim_sharding_type": "dp_reshardable"
    }
    full = optimizer_sharding_metadata("fully_reshardable")
    assert full["distrib_optim_sharding_type"] == "fully_reshardable"
    assert full["chained_optim_avoid_prefix"] is True  # keys independent of EP
    with pytest.raises(ValueError, match="fully_sharded_model_space"):
        optimizer_sharding_metadata("fully_sharded_model_space")


def _layout(dp: int = 2, ep: int = 1, tp: int = 1) -> ParallelLayout:
    return ParallelLayout(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        data_parallel_size=dp,
        world_size=dp * tp,
    )


def test_load_problems_name_what_cannot_reshard():
    dp_re = optimizer_record("dp_reshardable")
    full = optimizer_record("fully_reshardable")
    # DP size changes are fine for both formats.
    assert optimizer_load_problem(dp_re, "dp_reshardable", _layout(2), _layout(1)) is None
    assert optimizer_load_problem(full, "dp_reshardable", _layout(2), _layout(4)) is None
    # dp_reshardable: no model-parallel change.
    msg = optimizer_load_problem(dp_re, "dp_reshardable", _layout(2), _layout(2, ep=2))
    assert msg and "EP 1 -> 2" in msg and "--dist-ckpt-optim-fully-reshardable" in msg
    msg = optimizer_load_problem(dp_re, "dp_reshardable", _layout(2), _layout(1, tp=2))
    assert msg and "TP 1 -> 2" in msg
    # fully_reshardable: any layout with the same number of chained optimizers.
    assert (
        optimizer_load_problem(
            {**full, "parts": 2}, "dp_reshardable", _layout(2, ep=2), _layout(1, tp=2), 2
        )
        is None
    )
    msg = optimizer_load_problem({**full, "parts": 2}, None, _layout(2), _layout(1), 1)
    assert msg and "plain" in msg  # optimizer kind first
    msg = optimizer_load_problem(
        {**full, "parts": 2}, "fully_reshardable", _layout(2, ep=2), _layout(1), 1
    )
    assert msg and "2 chained optimizer(s) and this layout has 1" in msg


def test_plain_and_distributed_states_do_not_mix():
    legacy = {}  # full checkpoints written before the record existed: plain optimizer
    assert optimizer_load_problem(legacy, None, _layout(), _layout()) is None
    msg = optimizer_load_problem(legacy, "dp_reshardable", _layout(), _layout())
    assert msg and "plain optimizer" in msg and "--use-distributed-optimizer" in msg
    msg = optimizer_load_problem(optimizer_record("dp_reshardable"), None, _layout(), _layout())
    assert msg and "distributed optimizer" in msg


def test_cuda_type_names_only_inside_the_block():
    t = torch.zeros(2, dtype=torch.bfloat16)
    assert cuda_type_name("torch.BFloat16Tensor") == "torch.cuda.BFloat16Tensor"
    assert cuda_type_name("torch.cuda.FloatTensor") == "torch.cuda.FloatTensor"
    with cuda_type_names():
        assert t.type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float32).dtype == torch.float32  # conversions still convert
    assert t.type() == "torch.BFloat16Tensor"
    with pytest.raises(RuntimeError), cuda_type_names():
        raise RuntimeError("restored on error too")
    assert t.type() == "torch.BFloat16Tensor"
