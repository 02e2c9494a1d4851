"""Where megatron-core initialises the weights: on the GPU on CUDA (no host-memory peak at
scale), on the host on CPU and with --layout-independent-init."""

from __future__ import annotations

import pytest
import torch

from megatron_wsm import model as m
from megatron_wsm.config import ModelConfig, ParallelConfig


@pytest.mark.parametrize(
    "cuda, layout_independent, on_host",
    [(True, False, False), (True, True, True), (False, False, True), (False, True, True)],
)
def test_cpu_initialization_decision(cuda, layout_independent, on_host):
    assert m.cpu_initialization(cuda, layout_independent) is on_host


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("layout_independent", [False, True])
def test_transformer_config_follows_the_decision(monkeypatch, cuda, layout_independent):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_experts=4,
        layout_independent_init=layout_independent,
    )
    config = m.build_transformer_config(model, ParallelConfig(), m.FusionKernels())
    assert config.use_cpu_initialization is (layout_independent or not cuda)
