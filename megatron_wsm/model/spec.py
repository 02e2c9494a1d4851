"""Layer specs from megatron-core's own builders (``get_gpt_decoder_block_spec``), as
Megatron-LM's ``gpt_builders.py`` picks them, with checkpoint keys equal under both specs."""

from __future__ import annotations

import copy
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_wsm.accelerators import uses_transformer_engine
from megatron_wsm.config import ModelConfig
from megatron_wsm.model.attention import MLADotProductAttention, allow_local_mla
from megatron_wsm.model.norm import SequenceParallelTorchNorm, replace_norms


def local_keys_map(keys_map: dict[str, str], moe: bool, mla: bool) -> dict[str, str]:
    """The local layer's ``sharded_state_dict_keys_map`` that gives Transformer Engine's keys
    (a pure function).

    TE fuses a norm into the linear after it where one exists: the pre-MLP norm into a dense
    MLP's ``linear_fc1`` (not into an MoE layer, whose router comes first), and under
    multi-latent attention the query/key-value latent norms into ``linear_q_up_proj`` /
    ``linear_kv_up_proj``. The local spec keeps separate norms; mapping their key prefixes to
    the fused names makes the checkpoints of both specs identical.
    """
    out = dict(keys_map)
    if moe:
        out.pop("pre_mlp_layernorm.", None)
    elif mla:
        out["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    if mla:
        out["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        out["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    return out


def _is_moe_spec(spec: Any) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return getattr(spec.submodules.mlp, "module", None) is MoELayer


def build_layer_spec(config: TransformerConfig, model: ModelConfig) -> TransformerBlockSubmodules:
    """This pipeline stage's block spec: megatron-core's ``get_gpt_decoder_block_spec`` (dense
    and MoE layers laid out by ``--moe-layer-freq``; MLA, qk-layernorm from the config).

    TE spec when TE + CUDA are usable and ``--transformer-impl`` is ``transformer_engine`` (the
    default), else (``local``, or no TE) megatron-core's local one with SP-capable norms
    carrying TE's parameter names (:class:`SequenceParallelTorchNorm`,
    :func:`local_keys_map`), so both give the same checkpoint keys.
    """
    num_experts = model.num_experts or None
    if uses_transformer_engine(model.transformer_impl):
        return get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization=model.normalization
        )
    if getattr(config, "moe_grouped_gemm", False) and num_experts:
        # The local spec would fall back to the legacy GroupedMLP (another checkpoint layout):
        # without TE's spec the config must carry moe_grouped_gemm=False
        # (transformer_config_kwargs does; the flag is then accepted with a note,
        # ModelConfig.accelerator_notes).
        raise ValueError("moe_grouped_gemm=True reached the local spec; it needs the TE spec")
    if model.multi_latent_attention:
        allow_local_mla()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=model.normalization
    )
    fixed: dict[int, Any] = {}  # megatron-core shares one spec object between layers of a kind
    layer_specs = []
    for spec in block.layer_specs:
        if id(spec) not in fixed:
            new = copy.deepcopy(spec)
            new.submodules.sharded_state_dict_keys_map = local_keys_map(
                new.submodules.sharded_state_dict_keys_map or {},
                moe=_is_moe_spec(new),
                mla=model.multi_latent_attention,
            )
            if model.multi_latent_attention:
                new.submodules.self_attention.submodules.core_attention = MLADotProductAttention
            fixed[id(spec)] = replace_norms(new)
        layer_specs.append(fixed[id(spec)])
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=SequenceParallelTorchNorm)
