"""``--transformer-impl`` (Megatron-LM's): ``transformer_engine`` (the default) builds Transformer
Engine's layer spec where TE is usable, megatron-core's local spec elsewhere; ``local`` forces
the local spec everywhere. TE is not installed here: it is made to look usable by replacing the
probe, and megatron-core's TE spec builder by a recorder, so TE is never imported."""

from __future__ import annotations

import pytest

from megatron_wsm import accelerators
from megatron_wsm.accelerators import (
    GROUPED_GEMM_LOCAL_SPEC,
    GROUPED_GEMM_NO_EFFECT,
    SPEC_LOCAL,
    SPEC_TE,
    layer_spec_name,
)
from megatron_wsm.config import ConfigError
from megatron_wsm.model import FusionKernels
from megatron_wsm.testing.config import tiny_run_config

TE_KERNELS = FusionKernels(cuda=True, transformer_engine=True)


@pytest.fixture
def te_usable(monkeypatch):
    """Transformer Engine "usable" (the probe says so) without importing it."""
    monkeypatch.setattr(accelerators, "transformer_engine_usable", lambda: True)


def test_flag_default_and_choices(capsys):
    assert tiny_run_config().model.transformer_impl == "transformer_engine"
    assert tiny_run_config("--transformer-impl", "local").model.transformer_impl == "local"
    # a real flag now, not an "accepted, no effect here" one
    assert "no effect here: --transformer-impl" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tiny_run_config("--transformer-impl", "inference_optimized")
    assert "invalid choice: 'inference_optimized'" in capsys.readouterr().err


def test_spec_name_follows_the_flag_where_te_is_usable(te_usable):
    assert layer_spec_name() == SPEC_TE
    assert layer_spec_name("transformer_engine") == SPEC_TE
    assert layer_spec_name("local") == SPEC_LOCAL


def test_spec_name_without_te_is_local_for_both(monkeypatch):
    monkeypatch.setattr(accelerators, "transformer_engine_usable", lambda: False)
    assert layer_spec_name() == layer_spec_name("local") == SPEC_LOCAL


def test_local_picks_the_local_spec_and_the_default_te_s(megatron_world, te_usable, monkeypatch):
    from megatron_wsm.model import build_transformer_config, spec
    from megatron_wsm.model.norm import SequenceParallelTorchNorm

    real = spec.get_gpt_decoder_block_spec
    calls: list[bool] = []

    def recording(config, use_transformer_engine, **kw):
        calls.append(use_transformer_engine)
        if use_transformer_engine:
            return "TE spec"  # megatron-core's TE builder would import TE: not here
        return real(config, use_transformer_engine=False, **kw)

    monkeypatch.setattr(spec, "get_gpt_decoder_block_spec", recording)
    default = tiny_run_config()
    assert spec.build_layer_spec(
        build_transformer_config(default.model, default.parallel, FusionKernels()),
        default.model,
    ) == "TE spec"  # fmt: skip
    local = tiny_run_config("--transformer-impl", "local")
    tc = build_transformer_config(local.model, local.parallel, FusionKernels())
    assert tc.transformer_impl == "local"  # as Megatron-LM's config from args
    block = spec.build_layer_spec(tc, local.model)
    assert calls == [True, False]
    assert block.layer_norm is SequenceParallelTorchNorm  # the local spec, our norms
    assert all(s.submodules.sharded_state_dict_keys_map for s in block.layer_specs)


def test_grouped_gemm_reaches_megatron_core_only_with_te_s_spec(te_usable):
    from megatron_wsm.model.transformer_config import transformer_config_kwargs

    te = tiny_run_config("--moe-grouped-gemm")
    _, kw = transformer_config_kwargs(te.model, te.parallel, TE_KERNELS, True)
    assert kw["moe_grouped_gemm"] is True and kw["transformer_impl"] == "transformer_engine"
    assert te.model.accelerator_notes(te=True) == []
    local = tiny_run_config("--moe-grouped-gemm", "--transformer-impl", "local")
    _, kw = transformer_config_kwargs(local.model, local.parallel, TE_KERNELS, True)
    assert kw["moe_grouped_gemm"] is False and kw["transformer_impl"] == "local"
    assert local.model.accelerator_notes(te=True) == [GROUPED_GEMM_LOCAL_SPEC]
    assert local.model.accelerator_notes(te=False) == [GROUPED_GEMM_LOCAL_SPEC]
    assert te.model.accelerator_notes(te=False) == [GROUPED_GEMM_NO_EFFECT]


def test_context_parallel_with_local_is_refused_before_start():
    cfg = tiny_run_config("--transformer-impl", "local", "--context-parallel-size", "2")
    with pytest.raises(ConfigError, match="--transformer-impl local builds megatron-core's local"):
        cfg.validate(world_size=2, cuda=True)
    tiny_run_config("--context-parallel-size", "2").validate(world_size=2, cuda=True)


# ---------------------------------------------------- checkpoint keys: unchanged by the flag


def _keys(*flags: str) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_wsm.model import build_gpt_model, build_transformer_config

    cfg = tiny_run_config(*flags)
    cfg.validate(world_size=1, cuda=False)
    model = build_gpt_model(
        build_transformer_config(cfg.model, cfg.parallel, FusionKernels()), cfg.model, 512
    )
    return {
        sh.key for sh in nested_values(model.sharded_state_dict()) if isinstance(sh, ShardedTensor)
    }


def test_local_gives_the_default_checkpoint_keys_even_where_te_is_usable(
    megatron_world, monkeypatch
):
    """Where TE is not usable both values build the same (local) model; with TE "usable",
    ``local`` still builds the local spec (TE's would fail to import here), with the keys
    test_spec_keys.py pins to TE's names."""
    default = _keys()
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in default
    monkeypatch.setattr(accelerators, "transformer_engine_usable", lambda: True)
    assert _keys("--transformer-impl", "local") == default


def test_manifest_records_the_spec_the_run_built(te_usable):
    """The checkpoint manifest's ``layer_spec`` follows ``--transformer-impl``: a ``local`` run
    on a machine where TE is usable must not be recorded as a TE one."""
    from megatron_wsm.checkpoint.manager import _model_spec

    assert _model_spec("local")["layer_spec"] == SPEC_LOCAL
    assert _model_spec("local")["transformer_engine_version"] is None
    assert _model_spec("transformer_engine")["layer_spec"] == SPEC_TE
