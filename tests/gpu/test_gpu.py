"""CUDA code paths (skipped without CUDA; run on a GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

import math

import pytest

from tests.helpers import TINY_MODEL, losses, run_pretrain

pytestmark = pytest.mark.gpu


def test_cpu_shims_stay_off_with_cuda():
    from megatron_wsm import cpu_compat

    assert cpu_compat.apply() is False


def test_layer_spec_uses_transformer_engine_when_installed():
    pytest.importorskip("transformer_engine")
    from megatron_wsm.config import ModelConfig, ParallelConfig
    from megatron_wsm.model import build_layer_spec, build_transformer_config

    model = ModelConfig()
    spec = build_layer_spec(build_transformer_config(model, ParallelConfig()), model)
    names = repr(spec)
    assert "TE" in names, names


def test_trains_on_cuda_with_nccl(data_cache, tmp_path):
    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", "4", "--data-cache-dir", data_cache], tmp_path / "r.json"
    )
    got = losses(result)
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    assert got[-1] < got[0]


def test_bf16_training_on_cuda(data_cache, tmp_path):
    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", "4", "--bf16", "--data-cache-dir", data_cache],
        tmp_path / "r.json",
    )
    assert all(math.isfinite(x) for x in losses(result))
