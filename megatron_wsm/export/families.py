"""Which Hugging Face architecture a model exports to, and what that architecture cannot express.

Pure functions of the model config (``ModelConfig.to_json()``: Megatron-LM's argument names).
The choice follows what only one architecture can hold:

- Multi-Latent Attention with a sigmoid router → DeepSeek-V3 (``DeepseekV3ForCausalLM``: MLA,
  shared experts, dense first layers, sigmoid router with a score-correction bias,
  group-limited routing); with a softmax router → DeepSeek-V2 (``DeepseekV2ForCausalLM``: the
  same attention and layers, top-k of the softmax over all experts, scaled);
- a gated shared expert (``--moe-shared-expert-gate`` with shared experts) → Qwen2-MoE
  (``Qwen2MoeForCausalLM``: one sigmoid-gated shared expert per MoE layer, optional QKV
  bias, any mix of dense and MoE layers, softmax router with or without renormalised top-k);
- QK-layernorm → Qwen3-MoE (``Qwen3MoeForCausalLM``: per-head q/k RMSNorm, any mix of dense
  and MoE layers, softmax router with or without renormalised top-k);
- otherwise → Mixtral (``MixtralForCausalLM``).

Each architecture's refusals say, one message per reason, what the checkpoint's model computes
that the architecture would compute differently; the export refuses before writing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from megatron_wsm.config.layer_freq import LayerFreqError, parse_moe_layer_freq
from megatron_wsm.config.layer_freq import moe_layer_pattern as pattern_of
from megatron_wsm.export.mapping import DENSE_MLP, ExportError

MIXTRAL = "mixtral"
QWEN3_MOE = "qwen3_moe"
DEEPSEEK_V2 = "deepseek_v2"
DEEPSEEK_V3 = "deepseek_v3"
QWEN2_MOE = "qwen2_moe"
FAMILIES = (MIXTRAL, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3, QWEN2_MOE)
#: The transformers class each family's ``config.json`` names.
ARCHITECTURES = {
    MIXTRAL: "MixtralForCausalLM",
    QWEN3_MOE: "Qwen3MoeForCausalLM",
    DEEPSEEK_V2: "DeepseekV2ForCausalLM",
    DEEPSEEK_V3: "DeepseekV3ForCausalLM",
    QWEN2_MOE: "Qwen2MoeForCausalLM",
}
#: MLATransformerConfig's defaults (megatron-core 0.16), for a config that leaves them unset.
MLA_DEFAULTS = {
    "q_lora_rank": 512,
    "kv_lora_rank": 512,
    "qk_head_dim": 128,
    "qk_pos_emb_head_dim": 64,
    "v_head_dim": 128,
}

#: transformers builds DeepSeek-V3's latent norms with their default ε, not ``rms_norm_eps``.
DEEPSEEK_LATENT_NORM_EPS = 1e-6

_NAMES = {
    MIXTRAL: "Mixtral",
    QWEN3_MOE: "Qwen3-MoE",
    DEEPSEEK_V2: "DeepSeek-V2",
    DEEPSEEK_V3: "DeepSeek-V3",
    QWEN2_MOE: "Qwen2-MoE",
}
#: The checkpoint key suffix of the fused QKV bias (``--add-qkv-bias``), which Qwen2-MoE has.
QKV_BIAS_SUFFIX = "self_attention.linear_qkv.bias"
#: The shared experts' sigmoid gate (``--moe-shared-expert-gate``), which Qwen2-MoE has.
SHARED_GATE_SUFFIX = "shared_experts.gate_weight"


def family_name(family: str) -> str:
    """Human name of a family (``Qwen3-MoE``) for messages."""
    return _NAMES[family]


def moe_layer_pattern(model: Mapping[str, Any]) -> list[bool]:
    """Which layers are MoE (``True``) and which dense, as megatron-core builds them.

    ``moe_layer_freq`` N (int) makes layer i MoE when ``i % N == 0``; a list (or Megatron-LM's
    string expression of one) gives 1 (MoE) or 0 (dense) per layer (parsed by
    :mod:`megatron_wsm.config.layer_freq`, never evaluated). No experts: all dense.
    """
    layers = int(model["num_layers"])
    if not model.get("num_experts"):
        return [False] * layers
    freq = model.get("moe_layer_freq")
    try:
        pattern = pattern_of(parse_moe_layer_freq(1 if freq is None else freq), layers)
    except LayerFreqError as e:
        raise ExportError(str(e)) from e
    return [bool(v) for v in pattern]


def choose_family(model: Mapping[str, Any]) -> str:
    """The architecture a model config exports to (see the module docstring)."""
    if model.get("multi_latent_attention"):
        # The router decides between the two MLA models: DeepSeek-V2's is a softmax.
        if (model.get("moe_router_score_function") or "softmax") == "softmax":
            return DEEPSEEK_V2
        return DEEPSEEK_V3
    # megatron-core builds the gate only with shared experts (without them the flag does nothing).
    if model.get("moe_shared_expert_gate") and model.get("moe_shared_expert_intermediate_size"):
        return QWEN2_MOE
    if model.get("qk_layernorm"):
        return QWEN3_MOE
    return MIXTRAL


def _ne(default: Any) -> Callable[[Any], bool]:
    return lambda v: v is not None and v != default


#: Refusals of every family: (field, is_bad(value), message). A field the config lacks is fine.
_COMMON: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "normalization",
        _ne("RMSNorm"),
        "normalization {v!r}: {name} has only RMSNorm (no LayerNorm)",
    ),
    (
        "position_embedding_type",
        _ne("rope"),
        "position_embedding_type {v!r}: {name} has only "
        "rotary positions (no learned absolute positions)",
    ),
    ("num_experts", lambda v: not v, "num_experts {v!r}: a dense model is not a {name}"),
    ("add_bias_linear", bool, "add_bias_linear: {name}'s linear layers have no bias"),
    ("add_qkv_bias", bool, "add_qkv_bias: {name}'s attention has no bias"),
    ("swiglu", lambda v: v is False, "no --swiglu (GELU MLP): {name}'s MLPs are SwiGLU"),
    (
        "apply_layernorm_1p",
        bool,
        "apply_layernorm_1p: {name}'s RMSNorm scales by its weight, not 1 + weight",
    ),
    ("qk_l2_norm", bool, "qk_l2_norm: {name} has no L2 query/key norm"),
    (
        "moe_expert_capacity_factor",
        lambda v: v is not None and v >= 0,
        "moe_expert_capacity_factor {v!r}: {name} never drops tokens",
    ),
    ("moe_shared_expert_gate", bool, "moe_shared_expert_gate: {name} has no gated shared expert"),
    (
        "rotary_percent",
        _ne(1.0),
        "rotary_percent {v!r}: {name} rotates the whole head (under MLA its whole rotary part)",
    ),
    (
        "use_rope_scaling",
        bool,
        "use_rope_scaling: {name}'s export here writes plain RoPE "
        "(Llama-3 frequency scaling is not mapped)",
    ),
)

_NOT_MLA: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "rotary_interleaved",
        bool,
        "rotary_interleaved: {name} rotates halves, not interleaved pairs",
    ),
    (
        "moe_router_score_function",
        _ne("softmax"),
        "moe_router_score_function {v!r}: {name}'s router is a softmax",
    ),
    (
        "moe_router_enable_expert_bias",
        bool,
        "moe_router_enable_expert_bias: {name}'s router has no bias correction",
    ),
    (
        "moe_router_topk_scaling_factor",
        lambda v: v not in (None, 1, 1.0),
        "moe_router_topk_scaling_factor {v!r}: {name} does not scale routing weights",
    ),
    (
        "moe_router_num_groups",
        lambda v: bool(v) and v != 1,
        "moe_router_num_groups {v!r}: {name} has no group-limited routing",
    ),
    (
        "moe_router_group_topk",
        bool,
        "moe_router_group_topk {v!r}: {name} has no group-limited routing",
    ),
    (
        "moe_shared_expert_intermediate_size",
        bool,
        "moe_shared_expert_intermediate_size {v!r}: {name} has no shared experts (only the "
        "DeepSeek-V3 export, with --multi-latent-attention, has them)",
    ),
)


#: What Qwen2-MoE has that the tables above refuse for the other families.
_QWEN2_HAS = ("add_qkv_bias", "moe_shared_expert_gate", "moe_shared_expert_intermediate_size")


def _table_refusals(
    model: Mapping[str, Any], table: Any, name: str, skip: tuple[str, ...] = ()
) -> list[str]:
    out = []
    for field, bad, message in table:
        if field in skip:
            continue
        if field == "num_experts" or field in model:
            value = model.get(field)
            if bad(value):
                out.append(message.format(v=value, name=name))
    return out


def _mixtral_refusals(model: Mapping[str, Any]) -> list[str]:
    out = []
    if model.get("moe_router_pre_softmax"):
        out.append("moe_router_pre_softmax: Mixtral renormalises the top-k probabilities")
    if model.get("num_experts") and not all(moe_layer_pattern(model)):
        out.append(
            f"moe_layer_freq {model.get('moe_layer_freq')!r}: Mixtral has no dense "
            "layers between MoE layers (a QK-layernorm model exports as Qwen3-MoE, "
            "which has them)"
        )
    return out


def _qwen2_refusals(model: Mapping[str, Any]) -> list[str]:
    """What Qwen2-MoE cannot express beyond the common and non-MLA rules."""
    out = []
    if model.get("qk_layernorm"):
        out.append(
            "qk_layernorm: Qwen2-MoE has no query/key norm (Qwen3-MoE has one, but no "
            "shared experts)"
        )
    if model.get("num_experts") and not model.get("moe_shared_expert_intermediate_size"):
        out.append(
            "no moe_shared_expert_intermediate_size: every Qwen2-MoE MoE layer has a shared expert"
        )
    if model.get("num_experts") and not model.get("moe_shared_expert_gate"):
        out.append(
            "no moe_shared_expert_gate: Qwen2-MoE always scales its shared expert by a sigmoid "
            "gate (pass --moe-shared-expert-gate)"
        )
    return out


def _deepseek_refusals(model: Mapping[str, Any], family: str) -> list[str]:
    """MLA families: what DeepSeek-V2 / DeepSeek-V3 cannot express."""
    name = family_name(family)
    out = []
    if not model.get("qk_layernorm"):
        out.append(
            f"multi_latent_attention without qk_layernorm: {name} always normalises "
            "the query and key-value latents (q_a_layernorm, kv_a_layernorm)"
        )
    eps = model.get("norm_epsilon", model.get("layernorm_epsilon"))
    if eps is not None and float(eps) != DEEPSEEK_LATENT_NORM_EPS:
        # Measured: with ε = 1e-5 the logits of a tiny model differ by ~1e-4, with 1e-6 by 1e-7.
        out.append(
            f"norm epsilon {float(eps):g}: {name}'s q_a_layernorm and "
            f"kv_a_layernorm always use {DEEPSEEK_LATENT_NORM_EPS:g} "
            f"(pass --norm-epsilon {DEEPSEEK_LATENT_NORM_EPS:g})"
        )
    if model.get("rotary_interleaved"):
        out.append(
            "rotary_interleaved with multi_latent_attention: not mapped (megatron-core "
            f"MLA's default de-interleaved rotary is what {name} computes)"
        )
    rope_type = model.get("rope_type") or "yarn"  # MLATransformerConfig's default
    if rope_type not in ("rope", "yarn"):
        out.append(f"rope_type {rope_type!r}: not a megatron-core MLA rotary type")
    experts = int(model.get("num_experts") or 0)
    if not experts:
        return out
    pattern = moe_layer_pattern(model)
    first = pattern.index(True) if True in pattern else len(pattern)
    if not all(pattern[first:]):
        dense_after = pattern.index(False, first)
        out.append(
            f"moe_layer_freq {model.get('moe_layer_freq')!r}: layer {dense_after} is "
            f"dense after an MoE layer; {name} has dense layers only first "
            "(first_k_dense_replace)"
        )
    shared = int(model.get("moe_shared_expert_intermediate_size") or 0)
    ffn = int(
        model.get("moe_ffn_hidden_size")
        or model.get("ffn_hidden_size")
        or 4 * int(model["hidden_size"])
    )
    if not shared:
        out.append(
            f"no moe_shared_expert_intermediate_size: every {name} MoE layer has shared experts"
        )
    elif shared % ffn:
        out.append(
            f"moe_shared_expert_intermediate_size {shared} is not a multiple of the "
            f"expert width {ffn}: {name}'s shared experts are n_shared_experts "
            "× moe_intermediate_size wide"
        )
    groups = int(model.get("moe_router_num_groups") or 0)
    group_topk = int(model.get("moe_router_group_topk") or 0)
    topk = int(model.get("moe_router_topk") or 2)
    if bool(groups) != bool(group_topk) and groups != 1:
        out.append("moe_router_num_groups and moe_router_group_topk go together")
    score = model.get("moe_router_score_function") or "softmax"
    # megatron-core scores a group by the sum of its top (top-k // group-top-k) experts;
    # DeepSeek-V3 by the sum of its top 2, DeepSeek-V2 by its best one.
    per_group = 2 if family == DEEPSEEK_V3 else 1
    if groups and group_topk:
        if experts % groups:
            out.append(f"moe_router_num_groups {groups} does not divide {experts} experts")
        elif topk // group_topk != per_group:
            out.append(
                f"group-limited routing scores each group by its top "
                f"{topk // group_topk} experts (moe_router_topk {topk} // "
                f"moe_router_group_topk {group_topk}); {name} by its top {per_group}"
            )
    if family == DEEPSEEK_V3:
        if score != "sigmoid":
            out.append(f"moe_router_score_function {score!r}: DeepSeek-V3's router is a sigmoid")
        if (not groups or not group_topk) and experts < 2:
            out.append("fewer than 2 experts: DeepSeek-V3 scores expert groups by their top 2")
    else:  # DeepSeek-V2: softmax over all experts, top-k of it, scaled, not renormalised
        if not model.get("moe_router_pre_softmax"):
            out.append(
                "softmax router without moe_router_pre_softmax: megatron-core renormalises "
                "the top-k probabilities, DeepSeek-V2 takes them from the softmax over all "
                "experts (pass --moe-router-pre-softmax, as Megatron-LM's DeepSeek-V2 scripts)"
            )
        if model.get("moe_router_enable_expert_bias"):
            out.append(
                "moe_router_enable_expert_bias with a softmax router: DeepSeek-V2's router "
                "has no bias correction (DeepSeek-V3's sigmoid router has)"
            )
    return out


def _router_refusals(model: Mapping[str, Any], family: str) -> list[str]:
    """What megatron-core's router does at inference that no family's gate does."""
    out = []
    if model.get("num_experts") and model.get("moe_router_load_balancing_type") == "sinkhorn":
        # megatron-core's sinkhorn router, outside training: softmax over all experts and its
        # top k, unnormalised (Qwen3-MoE without norm_topk_prob); top-1: a sigmoid.
        if int(model.get("moe_router_topk") or 2) == 1:
            out.append(
                "sinkhorn routing with top-1 scores the expert by a sigmoid of its logit: "
                f"{family_name(family)} has no such gate"
            )
        elif family not in (QWEN3_MOE, QWEN2_MOE):
            out.append(
                "sinkhorn routing weighs experts by the unnormalised top-k of a softmax: "
                f"{family_name(family)} does not (Qwen3-MoE, with --qk-layernorm, does)"
            )
    if model.get("moe_input_jitter_eps"):
        out.append(
            "moe_input_jitter_eps: megatron-core jitters the router input at inference "
            "too; no Hugging Face gate does"
        )
    return out


def refusals(model: Mapping[str, Any], family: str) -> list[str]:
    """Why ``model`` cannot be exported as ``family`` (empty when it can)."""
    name = family_name(family)
    skip = _QWEN2_HAS if family == QWEN2_MOE else ()
    if not model.get("moe_shared_expert_intermediate_size"):
        skip += ("moe_shared_expert_gate",)  # megatron-core builds no gate without shared experts
    out = _table_refusals(model, _COMMON, name, skip) + _router_refusals(model, family)
    if family in (DEEPSEEK_V2, DEEPSEEK_V3):
        return out + _deepseek_refusals(model, family)
    out += _table_refusals(model, _NOT_MLA, name, skip)
    if family == MIXTRAL:
        out += _mixtral_refusals(model)
    if family == QWEN2_MOE:
        out += _qwen2_refusals(model)
    return out


def key_refusals(keys: list[str], family: str) -> list[str]:
    """Why checkpoint tensors cannot be ``family``'s, by key (one message per kind)."""
    name = family_name(family)
    qwen2 = family == QWEN2_MOE
    checks: list[tuple[Callable[[str], bool], str]] = [
        (
            lambda k: (
                k.endswith("bias")
                and "norm" not in k
                and "expert_bias" not in k
                and not (qwen2 and k.endswith(QKV_BIAS_SUFFIX))  # Qwen2-MoE's q/k/v biases
            ),
            "has linear biases ({k}): {name} has none",
        ),
        (
            lambda k: (
                k.endswith("layer_norm_bias")
                or k.endswith("norm.bias")
                or k.endswith("layernorm.bias")
            ),
            "has LayerNorm biases ({k}): {name} uses RMSNorm",
        ),
        (
            lambda k: "position_embeddings" in k,
            "has learned absolute positions ({k}): {name} uses rotary positions",
        ),
        (
            lambda k: k.endswith(SHARED_GATE_SUFFIX) and not qwen2,
            "has a gated shared expert ({k}): {name} has none",
        ),
    ]
    if family == MIXTRAL:
        checks.append(
            (lambda k: k in DENSE_MLP, "has dense MLP layers ({k}): every {name} layer is MoE")
        )
    if family == DEEPSEEK_V2:
        checks.append(
            (
                lambda k: "expert_bias" in k,
                "has a bias-corrected router ({k}): {name}'s router is a plain softmax",
            )
        )
    if family not in (DEEPSEEK_V2, DEEPSEEK_V3):
        checks += [
            (
                lambda k: "shared_expert" in k and not qwen2,
                "has shared experts ({k}): {name} has none",
            ),
            (
                lambda k: "expert_bias" in k,
                "has a bias-corrected router ({k}): {name}'s router is a plain softmax",
            ),
        ]
    out = []
    for bad, message in checks:
        hit = next((k for k in keys if bad(k)), None)
        if hit is not None:
            out.append("checkpoint " + message.format(k=hit, name=name))
    return out


def check_exportable(model: Mapping[str, Any], keys: list[str]) -> str:
    """The family of ``model``; :class:`ExportError` naming every reason (config and checkpoint
    keys) when it cannot be exported."""
    family = choose_family(model)
    try:
        problems = refusals(model, family) + key_refusals(keys, family)
    except ExportError as e:
        problems = [str(e)]
    if problems:
        raise ExportError(f"cannot export as {family_name(family)}: " + "; ".join(problems))
    return family
