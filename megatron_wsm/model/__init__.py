"""Build the MoE GPT model from megatron-core parts.

The model is megatron-core's ``GPTModel`` with MoE layers. With Transformer Engine and CUDA
present the TE layer spec is used; otherwise megatron-core's local (non-TE) spec, with one
change: the local spec's torch norm refuses ``sequence_parallel`` (which megatron-core
requires for MoE with TP > 1), so we swap in :class:`SequenceParallelTorchNorm`, which is the
same norm with its weights marked as sequence-parallel (so their gradients are all-reduced over
the TP group, as megatron-core does for its fused norms).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_wsm.accelerators import GROUPED_GEMM_NEEDS_TE, transformer_engine_usable
from megatron_wsm.checkpoint.keys import is_norm_param_key
from megatron_wsm.config import ModelConfig, ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: ``ModelConfig`` fields that ``TransformerConfig`` takes as they are, under the same name.
_MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
    "normalization",
)
#: The same for MoE models only.
_MOE_FIELDS = (
    "moe_router_topk",
    "moe_token_dispatcher_type",
    "moe_aux_loss_coeff",
    "moe_router_load_balancing_type",
    "moe_grouped_gemm",
)
#: ``ParallelConfig`` fields that ``TransformerConfig`` takes as they are.
_PARALLEL_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
)


class SequenceParallelTorchNorm(torch.nn.Module):
    """RMSNorm / LayerNorm in plain torch that accepts ``config.sequence_parallel``.

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so
    the norm weights see different gradients per rank; megatron-core's
    ``finalize_model_grads`` all-reduces parameters flagged ``sequence_parallel`` over the TP
    group, which is exactly what the flag set here asks for.

    The parameters sit on this module itself (``weight``, ``bias``), as on Transformer Engine's
    norms, so that checkpoint keys are the TE spec's (``…linear_qkv.layer_norm_weight``,
    ``final_layernorm.weight``) and a checkpoint moves between the specs unchanged. The
    arithmetic is ``torch.nn.functional.rms_norm`` / ``layer_norm``, as ``torch.nn.RMSNorm`` /
    ``LayerNorm`` compute it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.shape = (hidden_size,)
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return torch.nn.functional.rms_norm(hidden, self.shape, self.weight, self.eps)
        return torch.nn.functional.layer_norm(hidden, self.shape, self.weight, self.bias, self.eps)


def _replace_norms(spec: Any) -> Any:
    """Return ``spec`` with every local torch norm swapped for the SP-capable one."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, ModuleSpec):
        spec.module = _replace_norms(spec.module)
        if spec.submodules is not None:
            spec.submodules = _replace_norms(spec.submodules)
        return spec
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            setattr(spec, field.name, _replace_norms(getattr(spec, field.name)))
        return spec
    return spec


@dataclasses.dataclass(frozen=True)
class FusionKernels:
    """Which fused kernels import on this machine (see :func:`probe_fusion_kernels`)."""

    cuda: bool = False
    transformer_engine: bool = False  #: TE imports (fused RoPE, TE spec, grouped GEMM)
    masked_softmax: bool = False  #: megatron's ``scaled_*masked_softmax_cuda`` extensions
    wgrad_accumulation: bool = False  #: apex's ``fused_weight_gradient_mlp_cuda``
    triton: bool = False  #: torch.compile's GPU backend (megatron-core's ``jit_fuser``)


def _imports(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # a broken extension counts as absent: its fusion stays off
        return False
    return True


def probe_fusion_kernels() -> FusionKernels:
    """Try the imports each fusion needs; nothing is enabled that would fail on first use."""
    cuda = torch.cuda.is_available()
    if not cuda:
        return FusionKernels()
    return FusionKernels(
        cuda=True,
        transformer_engine=transformer_engine_usable(),
        masked_softmax=all(
            _imports(m)
            for m in ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
        ),
        wgrad_accumulation=_imports("fused_weight_gradient_mlp_cuda"),
        triton=_imports("triton"),
    )


def decide_fusions(kernels: FusionKernels) -> dict[str, bool]:
    """The megatron-core fusion switches for the kernels that import (a pure function).

    - ``masked_softmax_fusion``: the local spec's softmax calls
      ``scaled_upper_triang_masked_softmax_cuda`` for bf16/fp16 inputs; without that extension
      it must stay off (TE's attention does its own softmax and ignores the switch).
    - ``apply_rope_fusion``: TE's fused RoPE kernel.
    - ``bias_dropout_fusion``: ``torch.compile`` of the bias-dropout-add, which needs triton.
    - ``gradient_accumulation_fusion``: the output layer is megatron-core's own linear even
      under the TE spec, and it refuses the switch without apex's wgrad kernel.
    """
    on = kernels.cuda
    return {
        "masked_softmax_fusion": on and kernels.masked_softmax,
        "apply_rope_fusion": on and kernels.transformer_engine,
        "bias_dropout_fusion": on and kernels.triton,
        "gradient_accumulation_fusion": on and kernels.wgrad_accumulation,
    }


def cpu_initialization(cuda: bool, layout_independent_init: bool) -> bool:
    """Whether megatron-core initialises the weights on the host (``use_cpu_initialization``).

    On CUDA, no: each rank draws its own shard on its GPU (from the RNG tracker's streams),
    which avoids the slow start-up and host-memory peak of building every TP-split weight
    whole on the host. On CPU there is no other device. With ``--layout-independent-init``,
    yes: that option promises a start that does not depend on the layout or the device, and
    host initialisation leaves the RNG tracker's streams untouched (device initialisation
    advances the tensor- and expert-parallel streams by each rank's shard sizes, so dropout
    would draw differently per layout), builds TP-split weights whole (every TP size gets
    slices of one tensor) and computes the rotary frequencies on the host, as a CPU run does.
    """
    return layout_independent_init or not cuda


def build_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, kernels: FusionKernels | None = None
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for our model and parallel layout.

    ``kernels`` (default: probed on this machine) decides which fusions are on.
    """
    use_cuda = torch.cuda.is_available()
    fusions = decide_fusions(probe_fusion_kernels() if kernels is None else kernels)
    params_dtype = _DTYPES[model.params_dtype]
    num_experts = model.num_experts or None
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    kwargs: dict[str, Any] = {name: getattr(model, name) for name in _MODEL_FIELDS}
    kwargs.update({name: getattr(parallel, name) for name in _PARALLEL_FIELDS})
    kwargs.update(
        ffn_hidden_size=ffn,
        # Linear biases with TP hit an in-place-on-view autograd error on CPU in 0.16, and
        # modern MoE LLMs do without them anyway.
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        use_cpu_initialization=cpu_initialization(use_cuda, model.layout_independent_init),
        perform_initialization=True,
        **fusions,
        persist_layer_norm=False,
        deterministic_mode=not use_cuda,
    )
    if num_experts:
        kwargs.update({name: getattr(model, name) for name in _MOE_FIELDS})
        kwargs.update(
            num_moe_experts=num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or ffn,
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kwargs)


class GroupedGemmUnavailable(RuntimeError):
    """``--moe-grouped-gemm`` asked for without Transformer Engine."""


def build_layer_spec(config: TransformerConfig, model: ModelConfig) -> ModuleSpec:
    """TE spec when TE + CUDA are usable, else the local spec with SP-capable norms.

    Both specs give the same checkpoint keys: the local spec's norms carry TE's parameter names
    (:class:`SequenceParallelTorchNorm`), and in an MoE layer the pre-MLP norm keeps its own
    name, as under TE (whose MoE layer has no fused norm + fc1 to fold it into).
    """
    num_experts = model.num_experts or None
    if transformer_engine_usable():
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=model.moe_grouped_gemm
        )
    if model.moe_grouped_gemm and num_experts:
        # The local spec would fall back to the legacy GroupedMLP (another package, other
        # checkpoint layout); refuse rather than run something else than asked.
        raise GroupedGemmUnavailable(GROUPED_GEMM_NEEDS_TE)
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        normalization=model.normalization,
    )
    if num_experts:
        keys_map = dict(spec.submodules.sharded_state_dict_keys_map)
        keys_map.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys_map
    return _replace_norms(spec)


def build_gpt_model(config: TransformerConfig, model: ModelConfig, vocab_size: int) -> GPTModel:
    """One pipeline stage of the GPT model (pre/post process by stage position)."""
    layer_spec: Any = build_layer_spec(config, model)
    if not transformer_engine_usable():
        # The block's final norm comes from a module-level default (the torch norm that refuses
        # sequence parallel); a block spec lets us name ours. Layers of this stage only.
        from megatron.core.transformer.transformer_block import (
            TransformerBlockSubmodules,
            get_num_layers_to_build,
        )

        layer_spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(config),
            layer_norm=SequenceParallelTorchNorm,
        )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda(torch.cuda.current_device())
    return gpt


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so it splits evenly over TP ranks."""
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


def _key_seed(seed: int, key: str, row: int) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 7919 + row) % (2**63 - 1)


def layout_independent_init(model: torch.nn.Module, config: TransformerConfig, seed: int) -> None:
    """Re-initialise weights so their values do not depend on the TP/PP/EP layout.

    megatron-core draws initial weights per rank, so a PP=2 or EP=2 model starts from other
    numbers than a 1-process model with the same seed. Here every *global* tensor (as
    dist_checkpointing sees it: key, global shape) is drawn row by row along its first global
    dimension from a generator seeded by (seed, key, row), and each rank copies its own slice.
    Distributions follow megatron-core's defaults: N(0, σ) with σ = ``init_method_std``, and
    σ/√(2·num_layers) for the output projections (``linear_proj``, ``linear_fc2``); norm
    weights stay 1. Costs one global row per local row; meant for tests and small models
    (``--layout-independent-init``).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    std = config.init_method_std
    out_std = std / (2.0 * config.num_layers) ** 0.5
    with torch.no_grad():
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor) or sh.data is None:
                continue
            if not sh.data.is_floating_point() or not sh.key.endswith("weight"):
                continue
            if is_norm_param_key(sh.key):  # TE's fused `layer_norm_weight` included
                continue
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards are not supported here")
            sigma = out_std if ("linear_proj" in sh.key or "linear_fc2" in sh.key) else std
            local_full_shape = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
            slices = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local_full_shape))
            rows = []
            for row in range(slices[0].start, slices[0].stop):
                gen = torch.Generator().manual_seed(_key_seed(seed, sh.key, row))
                full_row = torch.randn(tuple(sh.global_shape[1:]), generator=gen)
                rows.append(full_row[slices[1:]])
            local = torch.stack(rows).reshape(sh.data.shape) * sigma
            sh.data.copy_(local.to(sh.data.dtype))
