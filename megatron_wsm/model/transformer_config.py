"""``ModelConfig`` + ``ParallelConfig`` → megatron-core ``TransformerConfig`` (Megatron-LM's
mapping: ``core_transformer_config_from_args`` in ``megatron/training/arguments.py``)."""

from __future__ import annotations

from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from megatron_wsm.config import ModelConfig, ParallelConfig
from megatron_wsm.model.fusions import (
    FusionKernels,
    cpu_initialization,
    decide_fusions,
    probe_fusion_kernels,
)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: ``ModelConfig`` fields that ``TransformerConfig`` takes as they are, under the same name.
_MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
    "normalization",
    "layernorm_epsilon",
    "kv_channels",
    "qk_layernorm",
    "add_bias_linear",
    "add_qkv_bias",
    "attention_softmax_in_fp32",
    "transformer_impl",
)
#: The same for multi-latent attention (``MLATransformerConfig``) only.
_MLA_FIELDS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "rotary_base",
    "rotary_percent",
    "rotary_scaling_factor",
    "mscale",
    "mscale_all_dim",
)
#: The same for MoE models only.
_MOE_FIELDS = (
    "moe_router_topk",
    "moe_token_dispatcher_type",
    "moe_aux_loss_coeff",
    "moe_router_load_balancing_type",
    "moe_grouped_gemm",
    "moe_layer_freq",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_overlap",
    "moe_shared_expert_gate",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_router_dtype",
    "moe_z_loss_coeff",
    "moe_expert_capacity_factor",
    "moe_token_drop_policy",
    "moe_pad_expert_input_to_capacity",
)
#: ``ParallelConfig`` fields that ``TransformerConfig`` takes as they are.
_PARALLEL_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
)


def activation_kwargs(swiglu: bool) -> dict[str, Any]:
    """``--swiglu``: gated linear unit with SiLU; without it Megatron-LM's GELU MLP (a pure
    function; the fused bias-activation kernels stay off, as on CPU they must)."""
    if swiglu:
        return {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}
    return {"gated_linear_unit": False, "activation_func": torch.nn.functional.gelu}


def transformer_config_kwargs(
    model: ModelConfig, parallel: ParallelConfig, kernels: FusionKernels, cuda: bool
) -> tuple[type[TransformerConfig], dict[str, Any]]:
    """The config class and its keyword arguments (pure: no probing, no construction)."""
    params_dtype = _DTYPES[model.params_dtype]
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    kwargs: dict[str, Any] = {name: getattr(model, name) for name in _MODEL_FIELDS}
    kwargs.update({name: getattr(parallel, name) for name in _PARALLEL_FIELDS})
    kwargs.update(
        num_query_groups=model.query_groups,
        ffn_hidden_size=ffn,
        **activation_kwargs(model.swiglu),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        use_cpu_initialization=cpu_initialization(cuda, model.layout_independent_init),
        perform_initialization=True,
        **decide_fusions(kernels),
        persist_layer_norm=False,
        deterministic_mode=not cuda,
    )
    cls: type[TransformerConfig] = TransformerConfig
    if model.multi_latent_attention:
        cls = MLATransformerConfig
        kwargs.update({name: getattr(model, name) for name in _MLA_FIELDS})
        kwargs["multi_latent_attention"] = True
    if model.num_experts:
        kwargs.update({name: getattr(model, name) for name in _MOE_FIELDS})
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or ffn,
            moe_permute_fusion=False,
            # Grouped GEMM is a TE kernel: without TE's spec (no TE, or --transformer-impl
            # local) the local spec's SequentialMLP runs the same experts (the flag is accepted
            # with a note, ModelConfig.accelerator_notes).
            moe_grouped_gemm=model.moe_grouped_gemm
            and kernels.transformer_engine
            and model.transformer_impl == "transformer_engine",
        )
    return cls, kwargs


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    kernels: FusionKernels | None = None,
    overrides: dict[str, Any] | None = None,
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` (``MLATransformerConfig`` with
    ``--multi-latent-attention``) for our model and parallel layout.

    ``kernels`` (default: probed on this machine) decides which fusions are on;
    ``overrides``: the training run's activation-recomputation fields and fusions switched
    off (``TrainingConfig.transformer_overrides``; memory and speed, not the model).
    """
    cls, kwargs = transformer_config_kwargs(
        model,
        parallel,
        probe_fusion_kernels() if kernels is None else kernels,
        torch.cuda.is_available(),
    )
    kwargs.update(overrides or {})
    return cls(**kwargs)
