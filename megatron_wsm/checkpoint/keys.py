"""One checkpoint key scheme for the local and the Transformer Engine layer specs.

The TE spec fuses the attention input norm into ``linear_qkv`` (``layer_norm_weight``), keeps
a separate ``pre_mlp_layernorm`` in MoE layers, fuses the dense MLP's norm into
``linear_fc1``, and names the final norm ``final_layernorm.weight``. Our local spec emits the
same names (see ``megatron_wsm.model.SequenceParallelTorchNorm``), so a checkpoint trained on
GPUs evaluates, merges and continues on CPU, and back.

Checkpoints written before that change carry the local spec's older names
(``…layer_norm_norm.weight``, ``final_layernorm.norm.weight``); :func:`adapt_load_request`
reads them by renaming the requested keys to the names the checkpoint has.

:func:`te_spec_param_keys` derives the TE spec's parameter keys on a machine without TE, from
megatron-core's own spec function, so a test can hold the two specs to one key list.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

#: Recorded in manifests: norm parameters carry Transformer Engine's names under both specs.
KEY_SCHEME = "te-norm-names"

#: New (TE) name → name the local spec wrote before both specs shared one scheme.
_LEGACY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)final_layernorm\.(weight|bias)$"), r"\1final_layernorm.norm.\2"),
    (
        re.compile(r"(^|\.)self_attention\.linear_qkv\.layer_norm_(weight|bias)$"),
        r"\1self_attention.linear_qkv.layer_norm_norm.\2",
    ),
    (
        re.compile(r"(^|\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$"),
        r"\1mlp.linear_fc1.layer_norm_norm.\2",
    ),
    # MoE layers: the old local key map folded the pre-MLP norm under mlp.linear_fc1.
    (
        re.compile(r"(^|\.)pre_mlp_layernorm\.(weight|bias)$"),
        r"\1mlp.linear_fc1.layer_norm_norm.\2",
    ),
)


#: Our (TE) name → the name Megatron-LM's local spec (``--transformer-impl local``) writes:
#: its MoE layers' key map files the pre-MLP norm under ``mlp.linear_fc1`` (a TE spec, and
#: megatron-wsm, keep ``pre_mlp_layernorm``).
# TODO(H5): megatron_wsm.checkpoint.megatron_lm's key aliases, once it lands, if it has them.
_MEGATRON_LM_LOCAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"(^|\.)pre_mlp_layernorm\.(weight|bias)$"),
        r"\1mlp.linear_fc1.layer_norm_\2",
    ),
)


def stored_names(key: str) -> list[str]:
    """Other names a checkpoint may hold ``key`` under, in the order tried: our older local
    spec's (:func:`legacy_key`), then Megatron-LM's local spec's. Optimizer state keys too."""
    names = [legacy_key(key)]
    for pattern, repl in _MEGATRON_LM_LOCAL_PATTERNS:
        new, n = pattern.subn(repl, key)
        if n:
            names.append(new)
    return [n for n in names if n is not None]


def legacy_key(key: str) -> str | None:
    """The name an older local-spec checkpoint stored ``key`` under; None if unchanged.

    Works on any key that ends in a model parameter's name, optimizer state keys included
    (``optimizer.state.exp_avg.decoder.final_layernorm.weight``).
    """
    for pattern, repl in _LEGACY_PATTERNS:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def is_norm_param_key(key: str) -> bool:
    """True for a norm's gain or bias under either spec's naming (old names included)."""
    parts = key.split(".")
    if parts[-1].startswith("layer_norm_"):  # TE's fused norm + linear
        return True
    owners = parts[:-1]
    return any(p == "norm" or p.endswith("layernorm") or p.endswith("_norm") for p in owners)


def checkpoint_keys(checkpoint_dir: Any) -> set[str]:
    """Every item key stored in a torch_dist checkpoint (read with the restricted unpickler).

    Sharded objects are stored as ``<key>/shard_…``; their ``<key>`` is included too.
    """
    from megatron_wsm.checkpoint import integrity as ckpt_integrity

    md = ckpt_integrity.load_metadata(checkpoint_dir)
    keys: set[str] = set()
    for fqn in md.state_dict_metadata:
        keys.add(fqn)
        if "/shard_" in fqn:
            keys.add(fqn.split("/shard_", 1)[0])
    return keys


def adapt_load_request(sharded: Any, stored: set[str]) -> dict[str, list[str]]:
    """Make a sharded state dict loadable from a checkpoint holding the keys ``stored``.

    In place: a requested tensor key the checkpoint lacks but holds under another name
    (:func:`stored_names`: our older local spec's, Megatron-LM's local spec's) is renamed to
    that name; the loaded value lands in the same place of
    the state dict, so the model sees no difference. A TE ``_extra_state`` object (FP8 scaling
    metadata) the checkpoint lacks, as a checkpoint of the local spec does, keeps the value
    the module has now instead of failing the load. Returns what was changed.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    changed: dict[str, list[str]] = {"renamed": [], "kept_local": []}

    def visit(value: Any) -> Any:
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if value.key not in stored:
                for old in stored_names(value.key):
                    if old in stored:
                        changed["renamed"].append(f"{value.key} <- {old}")
                        value.key = old
                        break
            return value
        if (
            isinstance(value, ShardedObject)
            and value.key.endswith("._extra_state")
            and value.key not in stored
        ):
            changed["kept_local"].append(value.key)
            return LocalNonpersistentObject(value.data)
        return value

    dict_list_map_inplace(visit, sharded)
    return changed


# ----------------------------------------------------------------------------- TE key list

#: Parameters of TE's modules (transformer_engine.pytorch) as megatron-core wraps them; the
#: ``LN`` ones exist only with LayerNorm (RMSNorm has no bias). Linear biases are off here.
_TE_PARAMS: dict[str, tuple[str, ...]] = {
    "TELayerNormColumnParallelLinear": ("layer_norm_weight", "layer_norm_bias:LN", "weight"),
    "TEColumnParallelLinear": ("weight",),
    "TELinear": ("weight",),  # multi-latent attention's down projections
    "TERowParallelLinear": ("weight",),
    "TEColumnParallelGroupedLinear": ("weight",),
    "TERowParallelGroupedLinear": ("weight",),
    "TENorm": ("weight", "bias:LN"),
    # megatron-core >= 0.19 builds the pre-MLP norm as a TENorm with has_residual=True
    "_TENormWithResidual": ("weight", "bias:LN"),
    "TEDotProductAttention": (),
    "IdentityOp": (),
    "IdentityFuncOp": (),
    "TopKRouter": ("weight",),  # megatron-core's own router, the same under both specs
}


def te_layer_spec(
    num_experts: int | None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
) -> Any:
    """megatron-core's TE layer spec, built even where TE is not installed.

    Without TE, megatron-core leaves ``TESpecProvider`` undefined in ``gpt_layer_specs`` and
    its version checks fail; both are lent for the call (the module classes exist as
    placeholders), so the spec's *structure* is megatron-core's own.
    """
    from megatron.core.extensions import transformer_engine_spec_provider as tsp
    from megatron.core.models.gpt import gpt_layer_specs as gls

    family = {"qk_layernorm": qk_layernorm, "multi_latent_attention": multi_latent_attention}
    if getattr(gls, "HAVE_TE", False):
        return gls.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **family
        )
    missing = object()
    saved_provider = gls.__dict__.get("TESpecProvider", missing)
    saved_check = tsp.is_te_min_version
    gls.TESpecProvider = tsp.TESpecProvider  # type: ignore[attr-defined]
    tsp.is_te_min_version = lambda *a, **k: True  # type: ignore[assignment]
    try:
        return gls.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, **family
        )
    finally:
        tsp.is_te_min_version = saved_check  # type: ignore[assignment]
        if saved_provider is missing:
            del gls.TESpecProvider  # type: ignore[attr-defined]
        else:
            gls.TESpecProvider = saved_provider  # type: ignore[attr-defined]


def _class_name(module: Any) -> str:
    # Without TE, megatron-core's TE classes are nameless placeholder objects: name them by
    # identity with the module's attributes.
    from megatron.core.extensions import transformer_engine as te_ext

    for name in _TE_PARAMS:
        if getattr(te_ext, name, None) is module and module is not None:
            return name
    return getattr(module, "__name__", type(module).__name__)


def _params(name: str, layer_norm: bool) -> list[str]:
    return [p.split(":")[0] for p in _TE_PARAMS[name] if not p.endswith(":LN") or layer_norm]


#: Spec entries megatron-core builds only when asked (shared experts: with
#: ``moe_shared_expert_intermediate_size``).
_NOT_BUILT = frozenset({"shared_experts"})


def _module_keys(spec: Any, layer_norm: bool, skip: frozenset[str] = _NOT_BUILT) -> list[str]:
    """Parameter keys (relative, sharded naming) of one spec entry; submodule fields named in
    ``skip`` are not built."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        module, submodules = spec.module, spec.submodules
    elif isinstance(spec, functools.partial):
        # megatron-core >= 0.19 writes some entries (the MoE layer, its experts) as
        # functools.partial(cls, submodules=...) instead of ModuleSpec(cls, submodules=...)
        module, submodules = spec.func, spec.keywords.get("submodules")
    else:
        module, submodules = spec, None
    name = _class_name(module)
    if name in _TE_PARAMS:
        return _params(name, layer_norm)
    if submodules is None:
        raise ValueError(f"no parameter table for {name}; extend _TE_PARAMS")
    keys: list[str] = []
    for field in dataclasses.fields(submodules):
        child = getattr(submodules, field.name)
        if field.name.endswith("_bda") or field.name == "activation_func" or child is None:
            continue
        if field.name == "sharded_state_dict_keys_map":
            continue
        if field.name in skip:
            continue
        keys += [f"{field.name}.{k}" for k in _module_keys(child, layer_norm, skip)]
    if name in ("SequentialMLP", "TEGroupedMLP"):
        # Both store experts under "<prefix>experts.<linear>" (TEGroupedMLP's sharded state
        # dict is documented as interchangeable with SequentialMLP's).
        keys = [f"experts.{k}" for k in keys]
    keys_map = getattr(submodules, "sharded_state_dict_keys_map", None) or {}
    mapped = []
    for k in keys:
        for src, dst in keys_map.items():
            if k.startswith(src):
                k = dst + k[len(src) :]
                break
        mapped.append(k)
    return mapped


def te_spec_param_keys(
    num_experts: int | None,
    normalization: str = "RMSNorm",
    untie_embeddings_and_output_weights: bool = True,
    position_embedding_type: str = "rope",
) -> list[str]:
    """Sorted parameter keys of a GPTModel built from the TE spec (layers stacked, as
    megatron-core's sharded state dict names them: ``decoder.layers.<layer key>``)."""
    layer_norm = normalization == "LayerNorm"
    layer = _module_keys(te_layer_spec(num_experts or None), layer_norm)
    keys = ["embedding.word_embeddings.weight"]
    if position_embedding_type == "learned_absolute":
        keys.append("embedding.position_embeddings.weight")
    keys += [f"decoder.layers.{k}" for k in layer]
    # The block's final norm is TENorm whenever TE imports (transformer_block.LayerNormImpl).
    keys += [f"decoder.final_layernorm.{k}" for k in _params("TENorm", layer_norm)]
    if untie_embeddings_and_output_weights:
        keys.append("output_layer.weight")
    return sorted(keys)


def te_family_param_keys(
    layer_pattern: list[int],
    num_experts: int | None,
    normalization: str = "RMSNorm",
    *,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
    q_lora_rank: int | None = None,
    shared_experts: bool = False,
    expert_bias: bool = False,
    qkv_bias: bool = False,
    shared_expert_gate: bool = False,
) -> list[str]:
    """Sorted keys of the decoder layers of a TE-spec model whose layer ``i`` is MoE when
    ``layer_pattern[i]`` is 1 (megatron-core's ``get_gpt_decoder_block_spec``).

    Mixed dense and MoE layers are stored per layer (``decoder.layers.<i>.…``; megatron-core's
    "non-homogeneous layers"), all-MoE or all-dense ones stacked (``decoder.layers.…``). MLA
    builds either the query projection or its LoRA pair (``q_lora_rank``); the router's
    ``expert_bias`` buffer is stored with ``--moe-router-enable-expert-bias``, the fused QKV's
    bias with ``--add-qkv-bias`` and the shared experts' ``gate_weight`` with
    ``--moe-shared-expert-gate``.
    """
    layer_norm = normalization == "LayerNorm"
    skip = set() if shared_experts else {"shared_experts"}
    if multi_latent_attention:
        skip |= (
            {"linear_q_down_proj", "linear_q_up_proj"} if q_lora_rank is None else {"linear_q_proj"}
        )
    per_kind = {}
    for kind, experts in ((0, None), (1, num_experts or None)):
        spec = te_layer_spec(
            experts, qk_layernorm=qk_layernorm, multi_latent_attention=multi_latent_attention
        )
        keys = _module_keys(spec, layer_norm, frozenset(skip))
        if experts and expert_bias:
            keys.append("mlp.router.expert_bias")
        if qkv_bias and not multi_latent_attention:
            keys.append("self_attention.linear_qkv.bias")
        if experts and shared_experts and shared_expert_gate:
            keys.append("mlp.shared_experts.gate_weight")
        per_kind[kind] = keys
    if len(set(layer_pattern)) == 1:
        return sorted(f"decoder.layers.{k}" for k in per_kind[layer_pattern[0]])
    return sorted(
        f"decoder.layers.{i}.{k}" for i, kind in enumerate(layer_pattern) for k in per_kind[kind]
    )
