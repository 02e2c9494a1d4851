"""Checkpoint tensors → Qwen3-MoE, Qwen2-MoE and DeepSeek tensors (pure functions, no files).

Like :func:`megatron_wsm.export.mapping.plan` (Mixtral), each HF tensor is "this global key,
at this leading index, through this transform". One difference: megatron-core stacks layers
along a leading dimension (``decoder.layers.X``, shape ``[num_layers, ...]``) only when every
layer has the same modules; with dense and MoE layers mixed (``--moe-layer-freq``) each layer
has its own keys (``decoder.layers.<i>.X``). :func:`layer_source` finds either.

HF names are those of the Hub checkpoints (one tensor per expert: ``mlp.experts.<e>.gate_proj``);
transformers fuses the experts on load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_wsm.export import families
from megatron_wsm.export.mapping import (
    EMBEDDING,
    NORM_KEYS,
    OUTPUT,
    ExportError,
    Shapes,
    TensorSpec,
    router_aux_loss_coef,
)

LAYERS = "decoder.layers."
#: Per-layer roles: the key suffixes (after ``decoder.layers.[<i>.]``) that can hold each, the
#: local spec's first, then Transformer Engine's fused-norm names.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "pre_mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "qkv": ("self_attention.linear_qkv.weight",),
    "qkv_bias": (families.QKV_BIAS_SUFFIX,),
    "proj": ("self_attention.linear_proj.weight",),
    "q_norm": ("self_attention.q_layernorm.weight",),
    "k_norm": ("self_attention.k_layernorm.weight",),
    "q_proj": ("self_attention.linear_q_proj.weight",),
    "q_down": ("self_attention.linear_q_down_proj.weight",),
    "q_up": ("self_attention.linear_q_up_proj.weight",),
    "q_lora_norm": (
        "self_attention.q_layernorm.weight",
        "self_attention.linear_q_up_proj.layer_norm_weight",
    ),
    "kv_down": ("self_attention.linear_kv_down_proj.weight",),
    "kv_up": ("self_attention.linear_kv_up_proj.weight",),
    "kv_lora_norm": (
        "self_attention.kv_layernorm.weight",
        "self_attention.linear_kv_up_proj.layer_norm_weight",
    ),
    "dense_fc1": ("mlp.linear_fc1.weight",),
    "dense_fc2": ("mlp.linear_fc2.weight",),
    "router": ("mlp.router.weight",),
    "expert_bias": ("mlp.router.expert_bias",),
    "expert_fc1": ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.linear_fc1.weight"),
    "expert_fc2": ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.linear_fc2.weight"),
    "shared_fc1": ("mlp.shared_experts.linear_fc1.weight",),
    "shared_fc2": ("mlp.shared_experts.linear_fc2.weight",),
    "shared_gate": ("mlp." + families.SHARED_GATE_SUFFIX,),
}


@dataclasses.dataclass(frozen=True)
class FamilyShapes(Shapes):
    """:class:`Shapes` plus what Qwen3-MoE and DeepSeek-V3 need."""

    family: str = families.MIXTRAL
    ffn_hidden_size: int = 0  #: dense layers' MLP width
    moe_layers: tuple[bool, ...] = ()  #: per layer: MoE (True) or dense
    shared_ffn_hidden_size: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_head_dim: int = 0  #: MLA: the non-rotary part of a query/key head
    qk_pos_emb_head_dim: int = 0  #: MLA: the rotary part
    v_head_dim: int = 0
    qkv_bias: bool = False  #: Qwen2-MoE: the QKV projection has a bias


def family_shapes(model: Mapping[str, Any], vocab_size: int, family: str) -> FamilyShapes:
    """:class:`FamilyShapes` of a model config (``ModelConfig.to_json()``)."""
    from megatron_wsm.export.mapping import shapes_from_config

    base = dataclasses.asdict(shapes_from_config(model, vocab_size))
    hidden = int(model["hidden_size"])
    extra: dict[str, Any] = {
        "family": family,
        "ffn_hidden_size": int(model.get("ffn_hidden_size") or 4 * hidden),
        "moe_layers": tuple(families.moe_layer_pattern(model)),
        "shared_ffn_hidden_size": int(model.get("moe_shared_expert_intermediate_size") or 0),
    }
    if family == families.QWEN2_MOE:  # megatron-core: a QKV bias with either flag
        extra["qkv_bias"] = bool(model.get("add_qkv_bias") or model.get("add_bias_linear"))
    if family in (families.DEEPSEEK_V2, families.DEEPSEEK_V3):
        mla = {k: model.get(k, v) for k, v in families.MLA_DEFAULTS.items()}
        extra.update(
            q_lora_rank=int(mla["q_lora_rank"]) if mla["q_lora_rank"] else None,
            kv_lora_rank=int(mla["kv_lora_rank"]),
            qk_head_dim=int(mla["qk_head_dim"]),
            qk_pos_emb_head_dim=int(mla["qk_pos_emb_head_dim"]),
            v_head_dim=int(mla["v_head_dim"]),
        )
    return FamilyShapes(**base, **extra)


def layer_source(
    keys: Mapping[str, tuple[int, ...]],
    layer: int,
    num_layers: int,
    role: str,
    shape: tuple[int, ...],
) -> tuple[str, tuple[int, ...]]:
    """(global key, leading index) of ``role`` in layer ``layer``: a per-layer key
    ``decoder.layers.<layer>.<suffix>`` of global shape ``shape``, or a stacked key
    ``decoder.layers.<suffix>`` of shape ``(num_layers, *shape)`` at index ``(layer,)``."""
    found = []
    for suffix in SUFFIXES[role]:
        own = f"{LAYERS}{layer}.{suffix}"
        if own in keys:
            found.append((own, (), tuple(shape)))
        stacked = LAYERS + suffix
        if stacked in keys:
            found.append((stacked, (layer,), (num_layers, *shape)))
    if not found:
        looked = ", ".join(f"{LAYERS}[{layer}.]{s}" for s in SUFFIXES[role])
        raise ExportError(
            f"checkpoint has no {role} tensor for layer {layer} (looked for {looked})"
        )
    if len(found) > 1:
        raise ExportError(
            f"checkpoint has {role} of layer {layer} twice ({', '.join(k for k, _, _ in found)})"
        )
    key, index, want = found[0]
    if tuple(keys[key]) != want:
        raise ExportError(f"{key} has global shape {tuple(keys[key])}, expected {want}")
    return key, index


class _Planner:
    """Collects specs and the keys they use (every model tensor must be used once or more)."""

    def __init__(self, shapes: FamilyShapes, keys: Mapping[str, tuple[int, ...]]) -> None:
        self.s, self.keys = shapes, keys
        self.specs: list[TensorSpec] = []
        self.used: set[str] = set()

    def layer(
        self,
        name: str,
        i: int,
        role: str,
        shape: tuple[int, ...],
        part: str = "all",
        source_shape: tuple[int, ...] | None = None,
        extra: tuple[int, ...] = (),
    ) -> None:
        key, index = layer_source(self.keys, i, self.s.num_layers, role, source_shape or shape)
        self.used.add(key)
        self.specs.append(TensorSpec(name, key, index + extra, part, shape))

    def experts(self, p: str, i: int, names: tuple[str, str, str]) -> None:
        s = self.s
        h, f, e = s.hidden_size, s.moe_ffn_hidden_size, s.num_experts
        fc1, idx1 = layer_source(self.keys, i, s.num_layers, "expert_fc1", (e, 2 * f, h))
        fc2, idx2 = layer_source(self.keys, i, s.num_layers, "expert_fc2", (e, h, f))
        self.used.update((fc1, fc2))
        gate, up, down = names
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            self.specs += [
                TensorSpec(q + gate + ".weight", fc1, (*idx1, x), "gate", (f, h)),
                TensorSpec(q + up + ".weight", fc1, (*idx1, x), "up", (f, h)),
                TensorSpec(q + down + ".weight", fc2, (*idx2, x), "all", (h, f)),
            ]

    def mlp(self, p: str, i: int, ffn: int, fc1: str, fc2: str, prefix: str) -> None:
        h = self.s.hidden_size
        self.layer(f"{p}{prefix}gate_proj.weight", i, fc1, (ffn, h), "gate", (2 * ffn, h))
        self.layer(f"{p}{prefix}up_proj.weight", i, fc1, (ffn, h), "up", (2 * ffn, h))
        self.layer(f"{p}{prefix}down_proj.weight", i, fc2, (h, ffn))

    def global_(
        self,
        name: str,
        candidates: Sequence[str],
        role: str,
        shape: tuple[int, ...],
        part: str = "all",
    ) -> str:
        found = [k for k in candidates if k in self.keys]
        if len(found) != 1:
            raise ExportError(
                f"checkpoint has {len(found)} {role} tensors (looked for {', '.join(candidates)})"
            )
        key = found[0]
        want = (self.keys[key][0], shape[1]) if part == "rows" else shape
        if tuple(self.keys[key]) != want:
            raise ExportError(f"{key} has global shape {tuple(self.keys[key])}, expected {want}")
        self.used.add(key)
        self.specs.append(TensorSpec(name, key, (), part, shape))
        return key

    def begin(self) -> None:
        s = self.s
        emb = self.global_(
            "model.embed_tokens.weight",
            [EMBEDDING],
            "word embedding",
            (s.vocab_size, s.hidden_size),
            "rows",
        )
        if self.keys[emb][0] < s.vocab_size:
            raise ExportError(
                f"{emb} has {self.keys[emb][0]} rows, fewer than the tokenizer's {s.vocab_size}"
            )

    def end(self) -> list[TensorSpec]:
        s = self.s
        self.global_("model.norm.weight", NORM_KEYS["final_norm"], "final norm", (s.hidden_size,))
        if not s.tied:
            self.global_(
                "lm_head.weight", [OUTPUT], "output layer", (s.vocab_size, s.hidden_size), "rows"
            )
        elif OUTPUT in self.keys:  # a pipeline's last stage may store its tied copy
            self.used.add(OUTPUT)
        left = sorted(set(self.keys) - self.used)
        if left:
            raise ExportError(
                f"checkpoint tensors {families.family_name(s.family)} has no "
                f"place for: {', '.join(left)}"
            )
        return self.specs


def _check_layers(s: FamilyShapes) -> None:
    if len(s.moe_layers) != s.num_layers:
        raise ExportError(f"{len(s.moe_layers)} MoE/dense flags for {s.num_layers} layers")


def plan_qwen3_moe(s: FamilyShapes, keys: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Every Qwen3-MoE tensor, in write order (raises :class:`ExportError` like ``plan``)."""
    _check_layers(s)
    pl = _Planner(s, keys)
    pl.begin()
    h, hd = s.hidden_size, s.head_dim
    nq, nkv = s.num_attention_heads * hd, s.num_query_groups * hd
    qkv_shape = (nq + 2 * nkv, h)
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        pl.layer(p + "input_layernorm.weight", i, "input_norm", (h,))
        pl.layer(p + "self_attn.q_proj.weight", i, "qkv", (nq, h), "q", qkv_shape)
        pl.layer(p + "self_attn.k_proj.weight", i, "qkv", (nkv, h), "k", qkv_shape)
        pl.layer(p + "self_attn.v_proj.weight", i, "qkv", (nkv, h), "v", qkv_shape)
        pl.layer(p + "self_attn.o_proj.weight", i, "proj", (h, nq))
        pl.layer(p + "self_attn.q_norm.weight", i, "q_norm", (hd,))
        pl.layer(p + "self_attn.k_norm.weight", i, "k_norm", (hd,))
        pl.layer(p + "post_attention_layernorm.weight", i, "pre_mlp_norm", (h,))
        if s.moe_layers[i]:
            pl.layer(p + "mlp.gate.weight", i, "router", (s.num_experts, h))
            pl.experts(p, i, ("gate_proj", "up_proj", "down_proj"))
        else:
            pl.mlp(p, i, s.ffn_hidden_size, "dense_fc1", "dense_fc2", "mlp.")
    return pl.end()


def plan_qwen2_moe(s: FamilyShapes, keys: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Every Qwen2-MoE tensor, in write order (raises :class:`ExportError` like ``plan``).

    As Qwen3-MoE without the q/k norms, plus the QKV bias (split like the weight's rows) and,
    in each MoE layer, the shared expert (``mlp.shared_expert.*``) with its sigmoid gate
    (``shared_experts.gate_weight`` [1, hidden] → ``mlp.shared_expert_gate.weight``).
    """
    _check_layers(s)
    pl = _Planner(s, keys)
    pl.begin()
    h, hd = s.hidden_size, s.head_dim
    nq, nkv = s.num_attention_heads * hd, s.num_query_groups * hd
    qkv_shape = (nq + 2 * nkv, h)
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        pl.layer(p + "input_layernorm.weight", i, "input_norm", (h,))
        for part, rows in (("q", nq), ("k", nkv), ("v", nkv)):
            pl.layer(f"{a}{part}_proj.weight", i, "qkv", (rows, h), part, qkv_shape)
            if s.qkv_bias:
                pl.layer(f"{a}{part}_proj.bias", i, "qkv_bias", (rows,), part, qkv_shape[:1])
        pl.layer(a + "o_proj.weight", i, "proj", (h, nq))
        pl.layer(p + "post_attention_layernorm.weight", i, "pre_mlp_norm", (h,))
        if s.moe_layers[i]:
            pl.layer(p + "mlp.gate.weight", i, "router", (s.num_experts, h))
            pl.experts(p, i, ("gate_proj", "up_proj", "down_proj"))
            pl.mlp(p, i, s.shared_ffn_hidden_size, "shared_fc1", "shared_fc2", "mlp.shared_expert.")
            pl.layer(p + "mlp.shared_expert_gate.weight", i, "shared_gate", (1, h))
        else:
            pl.mlp(p, i, s.ffn_hidden_size, "dense_fc1", "dense_fc2", "mlp.")
    return pl.end()


def plan_deepseek(s: FamilyShapes, keys: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Every DeepSeek-V3 (or DeepSeek-V2: the same but the router's correction bias) tensor,
    in write order (raises :class:`ExportError` like ``plan``).

    MLA maps one to one: ``linear_q_down_proj`` → ``q_a_proj``, ``q_layernorm`` →
    ``q_a_layernorm``, ``linear_q_up_proj`` → ``q_b_proj`` (or ``linear_q_proj`` → ``q_proj``
    without a query LoRA), ``linear_kv_down_proj`` → ``kv_a_proj_with_mqa`` (latent then rotary
    rows in both), ``kv_layernorm`` → ``kv_a_layernorm``, ``linear_kv_up_proj`` → ``kv_b_proj``
    (per head: key then value rows in both), ``linear_proj`` → ``o_proj``.
    """
    _check_layers(s)
    pl = _Planner(s, keys)
    pl.begin()
    h, heads = s.hidden_size, s.num_attention_heads
    q_head = s.qk_head_dim + s.qk_pos_emb_head_dim
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        pl.layer(p + "input_layernorm.weight", i, "input_norm", (h,))
        if s.q_lora_rank:
            pl.layer(a + "q_a_proj.weight", i, "q_down", (s.q_lora_rank, h))
            pl.layer(a + "q_a_layernorm.weight", i, "q_lora_norm", (s.q_lora_rank,))
            pl.layer(a + "q_b_proj.weight", i, "q_up", (heads * q_head, s.q_lora_rank))
        else:
            pl.layer(a + "q_proj.weight", i, "q_proj", (heads * q_head, h))
        pl.layer(
            a + "kv_a_proj_with_mqa.weight",
            i,
            "kv_down",
            (s.kv_lora_rank + s.qk_pos_emb_head_dim, h),
        )
        pl.layer(a + "kv_a_layernorm.weight", i, "kv_lora_norm", (s.kv_lora_rank,))
        pl.layer(
            a + "kv_b_proj.weight",
            i,
            "kv_up",
            (heads * (s.qk_head_dim + s.v_head_dim), s.kv_lora_rank),
        )
        pl.layer(a + "o_proj.weight", i, "proj", (h, heads * s.v_head_dim))
        pl.layer(p + "post_attention_layernorm.weight", i, "pre_mlp_norm", (h,))
        if s.moe_layers[i]:
            pl.layer(p + "mlp.gate.weight", i, "router", (s.num_experts, h))
            if s.family == families.DEEPSEEK_V3:
                name = p + "mlp.gate.e_score_correction_bias"
                try:
                    pl.layer(name, i, "expert_bias", (s.num_experts,))
                except ExportError:
                    if any(k.endswith("expert_bias") for k in keys):
                        raise
                    # No --moe-router-enable-expert-bias: a zero correction routes the same.
                    pl.specs.append(TensorSpec(name, "", (), "zeros", (s.num_experts,)))
            pl.experts(p, i, ("gate_proj", "up_proj", "down_proj"))
            pl.mlp(
                p, i, s.shared_ffn_hidden_size, "shared_fc1", "shared_fc2", "mlp.shared_experts."
            )
        else:
            pl.mlp(p, i, s.ffn_hidden_size, "dense_fc1", "dense_fc2", "mlp.")
    return pl.end()


def plan(s: FamilyShapes, keys: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    """The tensor plan of ``s.family`` (Mixtral: :func:`megatron_wsm.export.mapping.plan`)."""
    if s.family == families.QWEN3_MOE:
        return plan_qwen3_moe(s, keys)
    if s.family == families.QWEN2_MOE:
        return plan_qwen2_moe(s, keys)
    if s.family in (families.DEEPSEEK_V2, families.DEEPSEEK_V3):
        return plan_deepseek(s, keys)
    from megatron_wsm.export import mapping

    return mapping.plan(s, keys)


def _common_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    eps = model.get("norm_epsilon", model.get("layernorm_epsilon"))
    return {
        "architectures": [families.ARCHITECTURES[s.family]],
        "model_type": s.family,
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(model.get("max_position_embeddings") or 0),
        "initializer_range": float(model.get("init_method_std", 0.02)),
        # megatron-core's TransformerConfig.layernorm_epsilon default (--norm-epsilon).
        "rms_norm_eps": float(1e-5 if eps is None else eps),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(model.get("rotary_base") or 10000.0),
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "num_experts_per_tok": int(model.get("moe_router_topk", 2)),
        "output_router_logits": False,
        "router_aux_loss_coef": router_aux_loss_coef(model),
        "tie_word_embeddings": s.tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }


def qwen3_moe_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of a Qwen3-MoE export (transformers' ``Qwen3MoeConfig`` fields).

    megatron-core's softmax router without ``moe_router_pre_softmax`` takes the top-k logits
    and softmaxes over them: Qwen3-MoE's softmax renormalised over the top k
    (``norm_topk_prob``); with it, the plain softmax probabilities of the top k.
    """
    return {
        **_common_config(model, s, bos_id, eos_id, dtype),
        "intermediate_size": s.ffn_hidden_size,
        "moe_intermediate_size": s.moe_ffn_hidden_size,
        "num_key_value_heads": s.num_query_groups,
        "head_dim": s.head_dim,
        "num_experts": s.num_experts,
        # megatron-core's sinkhorn router, outside training, is a pre-softmax top-k too.
        "norm_topk_prob": not (
            model.get("moe_router_pre_softmax")
            or model.get("moe_router_load_balancing_type") == "sinkhorn"
        ),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(s.moe_layers) if not moe],
        "use_sliding_window": False,
        "sliding_window": None,
    }


def qwen2_moe_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of a Qwen2-MoE export (transformers' ``Qwen2MoeConfig`` fields).

    The router as Qwen3-MoE's (:func:`qwen3_moe_config`); every MoE layer has one shared
    expert of ``moe_shared_expert_intermediate_size``; dense layers are ``mlp_only_layers``.
    """
    qwen3 = qwen3_moe_config(model, s, bos_id, eos_id, dtype)
    qwen3.pop("attention_bias")  # Qwen2-MoE names it qkv_bias
    return {
        **qwen3,
        "architectures": [families.ARCHITECTURES[families.QWEN2_MOE]],
        "model_type": families.QWEN2_MOE,
        "shared_expert_intermediate_size": s.shared_ffn_hidden_size,
        "qkv_bias": s.qkv_bias,
        "max_window_layers": s.num_layers,
    }


def deepseek_v3_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of a DeepSeek-V3 export (transformers' ``DeepseekV3Config`` fields).

    - ``rope_interleave``: megatron-core's MLA de-interleaves the rotary part (even then odd
      elements) before rotating halves, which is what DeepSeek-V3's ``rope_interleave`` does.
    - ``norm_topk_prob``: megatron-core renormalises sigmoid top-k scores when top-k > 1.
    - without group-limited routing, one group of all experts (every expert eligible).
    """
    topk = int(model.get("moe_router_topk", 2))
    groups = int(model.get("moe_router_num_groups") or 0)
    group_topk = int(model.get("moe_router_group_topk") or 0)
    if not (groups and group_topk):
        groups = group_topk = 1
    first_dense = s.moe_layers.index(True) if True in s.moe_layers else s.num_layers
    scale = model.get("moe_router_topk_scaling_factor")
    return {
        **_common_config(model, s, bos_id, eos_id, dtype),
        "intermediate_size": s.ffn_hidden_size,
        "moe_intermediate_size": s.moe_ffn_hidden_size,
        "num_key_value_heads": s.num_attention_heads,
        "n_routed_experts": s.num_experts,
        "n_shared_experts": s.shared_ffn_hidden_size // s.moe_ffn_hidden_size,
        "first_k_dense_replace": first_dense,
        "routed_scaling_factor": float(scale) if scale else 1.0,
        "n_group": groups,
        "topk_group": group_topk,
        "norm_topk_prob": topk > 1,
        "q_lora_rank": s.q_lora_rank,
        "kv_lora_rank": s.kv_lora_rank,
        "qk_nope_head_dim": s.qk_head_dim,
        "qk_rope_head_dim": s.qk_pos_emb_head_dim,
        "v_head_dim": s.v_head_dim,
        "head_dim": s.qk_pos_emb_head_dim,
        "rope_interleave": True,
        "rope_parameters": mla_rope_parameters(model),
        "num_mtp_layers": 0,
    }


def deepseek_v2_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of a DeepSeek-V2 export (transformers' ``DeepseekV2Config`` fields).

    The router: softmax over all experts, top-k of it (``--moe-router-pre-softmax``), times
    ``routed_scaling_factor``; group-limited (``group_limited_greedy``) when megatron-core scores
    a group by its single best expert. DeepSeek-V2 rotates the rotary part as complex pairs
    (x[2i], x[2i+1]): the pairs megatron-core's MLA rotates after de-interleaving, in another
    order of the same dimensions for queries and keys alike, so the attention scores are equal.
    """
    v3 = deepseek_v3_config(model, s, bos_id, eos_id, dtype)
    for field in ("rope_interleave", "num_mtp_layers", "norm_topk_prob", "n_group", "topk_group"):
        v3.pop(field)
    groups = int(model.get("moe_router_num_groups") or 0)
    group_topk = int(model.get("moe_router_group_topk") or 0)
    limited = bool(groups and group_topk)
    return {
        **v3,
        "architectures": [families.ARCHITECTURES[families.DEEPSEEK_V2]],
        "model_type": families.DEEPSEEK_V2,
        "topk_method": "group_limited_greedy" if limited else "greedy",
        "n_group": groups if limited else None,
        "topk_group": group_topk if limited else None,
        "norm_topk_prob": False,
        "mlp_bias": False,
    }


def _yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention-scale term (the same formula in megatron-core and transformers)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope_parameters(model: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 ``rope_parameters`` for megatron-core MLA's rotary embedding.

    MLA's ``rope_type`` is ``yarn`` (MLATransformerConfig's default; Megatron-LM has no flag
    for it) with ``--rotary-scaling-factor`` (1: plain RoPE). YaRN maps field by field; the
    cos/sin factor is given explicitly (``attention_factor``) because transformers infers it
    as megatron-core does only when ``mscale`` and ``mscale_all_dim`` are both non-zero; the
    softmax scale (``mscale_all_dim``) is applied by DeepSeek-V3 itself, as by MLA.
    """
    theta = float(model.get("rotary_base") or 10000.0)
    factor = float(model.get("rotary_scaling_factor") or 1.0)
    if (model.get("rope_type") or "yarn") != "yarn" or factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    mscale = float(model.get("mscale", 1.0))
    mscale_all_dim = float(model.get("mscale_all_dim", 0.0))
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": int(
            model.get("original_max_position_embeddings") or 4096
        ),
        "beta_fast": float(model.get("beta_fast") or 32.0),
        "beta_slow": float(model.get("beta_slow") or 1.0),
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
        "attention_factor": _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim),
        "truncate": True,
    }


def hf_config(
    model: Mapping[str, Any], s: FamilyShapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of ``s.family``."""
    if s.family == families.QWEN3_MOE:
        return qwen3_moe_config(model, s, bos_id, eos_id, dtype)
    if s.family == families.QWEN2_MOE:
        return qwen2_moe_config(model, s, bos_id, eos_id, dtype)
    if s.family == families.DEEPSEEK_V3:
        return deepseek_v3_config(model, s, bos_id, eos_id, dtype)
    if s.family == families.DEEPSEEK_V2:
        return deepseek_v2_config(model, s, bos_id, eos_id, dtype)
    from megatron_wsm.export import mapping

    return mapping.mixtral_config(model, s, bos_id, eos_id, dtype)
