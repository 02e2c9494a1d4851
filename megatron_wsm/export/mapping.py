"""megatron-core GPT/MoE checkpoint tensors → Hugging Face Mixtral tensors (pure functions).

A torch_dist checkpoint stores *global* tensors whatever the TP/PP/EP layout: transformer layers
are stacked along a leading dimension (``decoder.layers.X`` has shape ``[num_layers, ...]``) and
SequentialMLP experts along a second one (``decoder.layers.mlp.experts.experts.X`` has shape
``[num_layers, num_experts, ...]``). So the mapping needs no knowledge of the writer's layout: an
HF tensor is "this global key, at this (layer[, expert]) index, through this transform".

Nothing here reads files; :mod:`megatron_wsm.export.reader` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

EXPERTS = "decoder.layers.mlp.experts.experts."

#: Each HF role with the checkpoint keys that can hold it, in both norm schemes the project
#: writes: the local spec (torch norms, ``…layer_norm_norm.weight`` / ``….norm.weight``) and
#: Transformer Engine's fused norms (``…layer_norm_weight`` / ``pre_mlp_layernorm.weight``).
NORM_KEYS: dict[str, tuple[str, ...]] = {
    "input_layernorm": (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_norm.weight",
        "decoder.layers.input_layernorm.weight",
        "decoder.layers.input_layernorm.norm.weight",
    ),
    "post_attention_layernorm": (
        "decoder.layers.pre_mlp_layernorm.weight",
        "decoder.layers.pre_mlp_layernorm.norm.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_norm.weight",
    ),
    "final_norm": ("decoder.final_layernorm.weight", "decoder.final_layernorm.norm.weight"),
}
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = (EXPERTS + "linear_fc1.weight", "decoder.layers.mlp.experts.linear_fc1.weight")
EXPERT_FC2 = (EXPERTS + "linear_fc2.weight", "decoder.layers.mlp.experts.linear_fc2.weight")
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
#: A dense (non-MoE) MLP's weights: present only when some layer is not an MoE layer.
DENSE_MLP = ("decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight")


class ExportError(Exception):
    """The checkpoint cannot be exported (one line: what and why)."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes the mapping needs, from the model config and the checkpoint."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    num_experts: int
    moe_ffn_hidden_size: int
    vocab_size: int  #: the tokenizer's size; padded rows beyond it are dropped
    tied: bool


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: ``transform(checkpoint[key][index])``."""

    name: str  #: HF parameter name
    key: str  #: checkpoint (global) key
    index: tuple[int, ...]  #: leading indices into the stacked global tensor
    part: str  #: which piece of the source slice (``all``, ``q``, ``k``, ``v``, ``gate``, ``up``,
    #: ``rows``: the first ``vocab_size`` rows; ``zeros``: no source, ``key`` is empty)
    shape: tuple[int, ...]  #: shape of the HF tensor

    def numel(self) -> int:
        """Number of elements of the HF tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def router_aux_loss_coef(model: Mapping[str, Any]) -> float:
    """The one ``router_aux_loss_coef`` an HF MoE config holds, from a model config that may
    carry several load-balancing types (Megatron-LM's list-valued flags): the ``aux_loss``
    type's coefficient (HF's loss is that one), else the first type's; 0 without any."""
    types = model.get("moe_router_load_balancing_type") or "aux_loss"
    coeffs = model.get("moe_aux_loss_coeff") or 0.0
    if not isinstance(types, list):
        types = [types]
    if not isinstance(coeffs, list):
        coeffs = [coeffs] * len(types)
    paired = dict(zip(types, (float(c) for c in coeffs), strict=False))
    return paired.get("aux_loss", next(iter(paired.values()), 0.0))


def split_qkv(
    weight: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split megatron-core's fused QKV weight (or bias) into HF ``q_proj``, ``k_proj``,
    ``v_proj``.

    megatron-core orders the fused rows per query group: that group's ``num_heads/num_groups``
    query heads, then its key head, then its value head (each ``head_dim`` rows). HF keeps query
    heads in order, so query head ``h`` belongs to key/value head ``h // (num_heads/num_groups)``
    — the same grouping ``repeat_kv`` applies.
    """
    if num_heads % num_groups:
        raise ExportError(f"{num_heads} attention heads do not split into {num_groups} groups")
    per_group = num_heads // num_groups
    # ``[rows, hidden]`` for the weight, ``[rows]`` for the QKV bias (same row order).
    trailing = tuple(weight.shape[1:])
    expected = num_groups * (per_group + 2) * head_dim
    if weight.shape[0] != expected:
        raise ExportError(
            f"fused QKV has {weight.shape[0]} rows, expected {expected} "
            f"({num_groups} groups × ({per_group} q + 1 k + 1 v) × head_dim {head_dim})"
        )
    grouped = weight.reshape(num_groups, per_group + 2, head_dim, *trailing)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *trailing)
    k = grouped[:, per_group].reshape(num_groups * head_dim, *trailing)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, *trailing)
    return q, k, v


def split_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU ``linear_fc1`` = ``[gate; up]`` (``silu(gate x) * up x``) → Mixtral ``w1``, ``w3``."""
    if weight.shape[0] % 2:
        raise ExportError(f"gated linear_fc1 has an odd number of rows ({weight.shape[0]})")
    gate, up = torch.chunk(weight, 2, dim=0)
    return gate, up


def apply_part(spec: TensorSpec, shapes: Shapes, source: torch.Tensor) -> torch.Tensor:
    """The HF tensor of ``spec`` from its source slice (a view where possible)."""
    if spec.part == "all":
        out = source
    elif spec.part in ("q", "k", "v"):
        q, k, v = split_qkv(
            source, shapes.num_attention_heads, shapes.num_query_groups, shapes.head_dim
        )
        out = {"q": q, "k": k, "v": v}[spec.part]
    elif spec.part in ("gate", "up"):
        gate, up = split_fc1(source)
        out = gate if spec.part == "gate" else up
    elif spec.part == "rows":
        out = source[: shapes.vocab_size]
    elif spec.part == "zeros":  # a tensor the checkpoint does not store (a zero router bias)
        out = torch.zeros(spec.shape, dtype=source.dtype)
    else:  # pragma: no cover - specs are built below
        raise ValueError(f"unknown part {spec.part!r}")
    if tuple(out.shape) != spec.shape:
        raise ExportError(
            f"{spec.key}{list(spec.index)} gives {spec.name} of shape {tuple(out.shape)}, "
            f"expected {spec.shape}"
        )
    return out


def shapes_from_config(model: Mapping[str, Any], vocab_size: int) -> Shapes:
    """:class:`Shapes` of a model config (``ModelConfig.to_json()``) and the tokenizer size."""
    hidden = int(model["hidden_size"])
    heads = int(model["num_attention_heads"])
    ffn = model.get("ffn_hidden_size") or 4 * hidden
    return Shapes(
        num_layers=int(model["num_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(model.get("num_query_groups") or heads),
        head_dim=int(model.get("kv_channels") or hidden // heads),
        num_experts=int(model.get("num_experts") or 0),
        moe_ffn_hidden_size=int(model.get("moe_ffn_hidden_size") or ffn),
        vocab_size=int(vocab_size),
        tied=not model.get("untie_embeddings_and_output_weights", True),
    )


# What Mixtral cannot express is decided with every family's rules in
# megatron_wsm.export.families (refusals / key_refusals with families.MIXTRAL).


def _pick(keys: Mapping[str, tuple[int, ...]], candidates: Sequence[str], role: str) -> str:
    found = [k for k in candidates if k in keys]
    if not found:
        raise ExportError(f"checkpoint has no {role} tensor (looked for {', '.join(candidates)})")
    if len(found) > 1:
        raise ExportError(f"checkpoint has {role} twice ({', '.join(found)})")
    return found[0]


def plan(shapes: Shapes, keys: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Every HF tensor of the export, in write order, from the checkpoint's global shapes.

    ``keys`` maps each floating-point model tensor of the checkpoint to its global shape.
    Raises :class:`ExportError` when a tensor is missing, has an unexpected shape, or a model
    tensor would be left unexported.
    """
    s = shapes
    h, layers, experts = s.hidden_size, s.num_layers, s.num_experts
    used: set[str] = set()

    def need(candidates: Sequence[str] | str, role: str, shape: tuple[int, ...]) -> str:
        key = _pick(keys, [candidates] if isinstance(candidates, str) else candidates, role)
        if tuple(keys[key]) != shape:
            raise ExportError(f"{key} has global shape {tuple(keys[key])}, expected {shape}")
        used.add(key)
        return key

    qkv_rows = (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim
    emb = _pick(keys, [EMBEDDING], "word embedding")
    padded = keys[emb][0]
    if padded < s.vocab_size:
        raise ExportError(f"{emb} has {padded} rows, fewer than the tokenizer's {s.vocab_size}")
    need(emb, "word embedding", (padded, h))
    in_norm = need(NORM_KEYS["input_layernorm"], "input norm", (layers, h))
    post_norm = need(NORM_KEYS["post_attention_layernorm"], "pre-MLP norm", (layers, h))
    qkv = need(QKV, "fused QKV", (layers, qkv_rows, h))
    proj = need(PROJ, "attention output", (layers, h, s.num_attention_heads * s.head_dim))
    router = need(ROUTER, "router", (layers, experts, h))
    f = s.moe_ffn_hidden_size
    fc1 = need(EXPERT_FC1, "expert linear_fc1", (layers, experts, 2 * f, h))
    fc2 = need(EXPERT_FC2, "expert linear_fc2", (layers, experts, h, f))
    final = need(NORM_KEYS["final_norm"], "final norm", (h,))
    if not s.tied:
        out_key = need(OUTPUT, "output layer", (padded, h))
    elif OUTPUT in keys:  # a pipeline's last stage may store its copy of the tied embedding
        used.add(OUTPUT)

    attn_q = s.num_attention_heads * s.head_dim
    kv = s.num_query_groups * s.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", emb, (), "rows", (s.vocab_size, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", in_norm, (i,), "all", (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", qkv, (i,), "q", (attn_q, h)),
            TensorSpec(p + "self_attn.k_proj.weight", qkv, (i,), "k", (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", qkv, (i,), "v", (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", proj, (i,), "all", (h, attn_q)),
            TensorSpec(p + "post_attention_layernorm.weight", post_norm, (i,), "all", (h,)),
            TensorSpec(p + "block_sparse_moe.gate.weight", router, (i,), "all", (experts, h)),
        ]
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            specs += [
                # w1 and w3 next to each other: both come from one read of linear_fc1.
                TensorSpec(q + "w1.weight", fc1, (i, e), "gate", (f, h)),
                TensorSpec(q + "w3.weight", fc1, (i, e), "up", (f, h)),
                TensorSpec(q + "w2.weight", fc2, (i, e), "all", (h, f)),
            ]
    specs.append(TensorSpec("model.norm.weight", final, (), "all", (h,)))
    if not s.tied:
        specs.append(TensorSpec("lm_head.weight", out_key, (), "rows", (s.vocab_size, h)))
    left = sorted(set(keys) - used)
    if left:
        raise ExportError(f"checkpoint tensors Mixtral has no place for: {', '.join(left)}")
    return specs


def mixtral_config(
    model: Mapping[str, Any], shapes: Shapes, bos_id: int, eos_id: int, dtype: str
) -> dict[str, Any]:
    """``config.json`` of the exported model (transformers' ``MixtralConfig`` fields)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": shapes.vocab_size,
        "hidden_size": shapes.hidden_size,
        "intermediate_size": shapes.moe_ffn_hidden_size,
        "num_hidden_layers": shapes.num_layers,
        "num_attention_heads": shapes.num_attention_heads,
        "num_key_value_heads": shapes.num_query_groups,
        "head_dim": shapes.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(model.get("max_position_embeddings") or 0),
        "initializer_range": float(model.get("init_method_std", 0.02)),
        # megatron-core's TransformerConfig.layernorm_epsilon default; our norms pass it on.
        "rms_norm_eps": float(model.get("norm_epsilon") or model.get("layernorm_epsilon") or 1e-5),
        "use_cache": True,
        "rope_theta": float(model.get("rotary_base", 10000.0)),
        "attention_dropout": 0.0,
        "sliding_window": None,
        "num_local_experts": shapes.num_experts,
        "num_experts_per_tok": int(model.get("moe_router_topk", 2)),
        "output_router_logits": False,
        "router_aux_loss_coef": router_aux_loss_coef(model),
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": shapes.tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
