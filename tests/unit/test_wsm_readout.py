"""The pure parts of the merged readout: swapping weights in and out bit-exactly, the read
request that must not alias the live parameters, tags and configuration checks."""

from __future__ import annotations

import pytest
import torch

from megatron_wsm import metric_names as names
from megatron_wsm.coefficients import MergeMethod
from megatron_wsm.config import ConfigError
from megatron_wsm.merge import method_coefficients
from megatron_wsm.testing.config import tiny_run_config
from megatron_wsm.wsm_readout import _read_request, swap_weights, swapped_in


def _module(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7)).to(dtype)
    m.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_twice_restores_the_model_bit_exactly(dtype: torch.dtype) -> None:
    m = _module(dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params_before = [p.data_ptr() for p in m.parameters()]
    merged = {
        k: torch.randn(v.shape, dtype=torch.float32)
        for k, v in m.state_dict().items() if v.is_floating_point()
    }
    expected = {k: v.to(dtype, copy=True) for k, v in merged.items()}
    swap_weights(m, merged)
    for k, v in expected.items():
        assert torch.equal(m.state_dict()[k], v), k  # cast like --output-dtype same
    assert [p.data_ptr() for p in m.parameters()] == params_before  # same tensors, in place
    swap_weights(m, merged)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_swapped_in_restores_after_an_error() -> None:
    m = _module(torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    merged = {k: torch.zeros_like(v) for k, v in before.items() if v.is_floating_point()}
    with pytest.raises(RuntimeError, match="boom"), swapped_in(m, merged):
        assert float(m[0].weight.abs().sum()) == 0.0
        raise RuntimeError("boom")
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_read_request_does_not_alias_live_parameters() -> None:
    """megatron-core loads into the request's tensors: they must be fresh buffers."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    w = torch.randn(4, 3)
    steps = torch.tensor([1])
    sd = {
        "w": ShardedTensor.from_rank_offsets("w", w),
        "steps": ShardedTensor.from_rank_offsets("steps", steps),
        "x._extra_state": ShardedObject("x._extra_state", None, (1,), (0,)),
    }
    request = _read_request(sd)
    assert set(request) == {"w"}  # integer tensors and objects stay the live ones
    assert request["w"].data.shape == w.shape and request["w"].data.dtype == w.dtype
    assert request["w"].data.data_ptr() != w.data_ptr()
    assert request["w"].key == "w" and sd["w"].data is w  # the model's own dict untouched


def test_readout_tags_sit_next_to_the_live_ones() -> None:
    assert names.wsm_readout(names.VALID_LOSS, "1-sqrt") == "validation/lm loss wsm-1-sqrt"
    assert names.wsm_readout(names.VALID_PPL, "mean") == "validation/lm loss wsm-mean ppl"


def test_megatron_lm_convention_refuses_uneven_positions() -> None:
    m = MergeMethod("mean", convention="megatron-lm")
    assert method_coefficients(m, [10, 20, 30]) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="unevenly spaced"):
        method_coefficients(m, [10, 20, 40])


def _validate(*flags: str | int) -> None:
    tiny_run_config("--save", "/tmp/x", *flags).validate(world_size=1, cuda=False)


def test_eval_methods_configuration() -> None:
    ok = ("--wsm-interval", 2, "--wsm-window", 4, "--eval-interval", 4)
    _validate(*ok, "--wsm-eval-methods", "1-sqrt,mean")
    cfg = tiny_run_config(*ok, "--wsm-eval-methods", " 1-sqrt , ema")
    assert cfg.wsm.eval_methods == ["1-sqrt", "ema"]
    assert cfg.wsm.window_size(tokens_per_iter=128) == 3
    with pytest.raises(ConfigError, match="give a comma list"):
        _validate(*ok, "--wsm-eval-methods", "cosine-ish")
    with pytest.raises(ConfigError, match="give a comma list"):
        _validate(*ok, "--wsm-eval-methods", "custom")
    with pytest.raises(ConfigError, match="needs --wsm-interval"):
        _validate("--eval-interval", 4, "--wsm-eval-methods", "mean")
    with pytest.raises(ConfigError, match="multiple of the window-save interval"):
        _validate("--wsm-interval", 3, "--eval-interval", 4, "--wsm-eval-methods", "mean")
    with pytest.raises(ConfigError, match="multiple of the window-save interval"):
        _validate("--wsm-interval", 2, "--eval-interval", 0, "--wsm-eval-methods", "mean")


def test_window_size_in_tokens() -> None:
    cfg = tiny_run_config("--wsm-interval-tokens", 256, "--wsm-window-tokens", 1024)
    # TINY_MODEL: 4 sequences of 32 tokens per iteration = 128 tokens.
    assert cfg.wsm.interval_iters(128) == 2
    assert cfg.wsm.window_size(128) == 1024 // 256 + 1
    assert tiny_run_config("--wsm-interval", 2).wsm.window_size(128) is None
