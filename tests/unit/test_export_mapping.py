"""The checkpoint → Mixtral mapping: QKV/SwiGLU splits, key planning, refusals (no files)."""

from __future__ import annotations

import pytest
import torch

from megatron_wsm.export import mapping
from megatron_wsm.export.mapping import ExportError

BASE = {
    "num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "num_query_groups": None,
    "num_experts": 3, "moe_ffn_hidden_size": 8, "normalization": "RMSNorm",
    "position_embedding_type": "rope", "untie_embeddings_and_output_weights": True,
    "max_position_embeddings": 32, "moe_router_topk": 2,
}


def _fused(heads: int, groups: int, hd: int, hidden: int) -> tuple[torch.Tensor, list, list, list]:
    """A fused QKV weight whose every row says which (kind, head, row) it is."""
    per = heads // groups
    rows, q, k, v = [], {}, {}, {}
    for g in range(groups):
        for j in range(per):
            for r in range(hd):
                rows.append(("q", g * per + j, r))
        rows += [("k", g, r) for r in range(hd)] + [("v", g, r) for r in range(hd)]
    code = {"q": 0, "k": 1, "v": 2}
    w = torch.tensor(
        [[code[a] * 10000 + b * 100 + c] * hidden for a, b, c in rows], dtype=torch.float64
    )
    for name, store, n in (("q", q, heads), ("k", k, groups), ("v", v, groups)):
        store[name] = [code[name] * 10000 + h * 100 + r for h in range(n) for r in range(hd)]
    return w, q["q"], k["k"], v["v"]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 2), (4, 1)])
def test_split_qkv_orders_heads_like_hf(heads, groups):
    w, want_q, want_k, want_v = _fused(heads, groups, hd=3, hidden=5)
    q, k, v = mapping.split_qkv(w, heads, groups, 3)
    assert q[:, 0].long().tolist() == want_q
    assert k[:, 0].long().tolist() == want_k
    assert v[:, 0].long().tolist() == want_v


def test_split_qkv_matches_megatron_attention_math():
    """q/k/v projections from the split equal megatron's view of the fused projection."""
    torch.manual_seed(0)
    heads, groups, hd, hidden = 4, 2, 3, 6
    w = torch.randn((heads + 2 * groups) * hd, hidden)
    x = torch.randn(5, hidden)
    fused = (x @ w.T).view(5, groups, heads // groups + 2, hd)  # megatron-core's split
    q, k, v = mapping.split_qkv(w, heads, groups, hd)
    torch.testing.assert_close((x @ q.T).view(5, heads, hd),
                               fused[:, :, : heads // groups].reshape(5, heads, hd))
    torch.testing.assert_close((x @ k.T).view(5, groups, hd), fused[:, :, -2])
    torch.testing.assert_close((x @ v.T).view(5, groups, hd), fused[:, :, -1])


def test_split_qkv_refuses_wrong_rows():
    with pytest.raises(ExportError, match="fused QKV has 10 rows"):
        mapping.split_qkv(torch.zeros(10, 4), 4, 2, 2)


def test_split_fc1_is_gate_then_up():
    w = torch.arange(8.0).view(4, 2)
    gate, up = mapping.split_fc1(w)
    assert gate.tolist() == [[0, 1], [2, 3]] and up.tolist() == [[4, 5], [6, 7]]
    x = torch.randn(3, 2)
    swiglu = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)  # megatron's glu(fc1(x))
    g, u = torch.chunk(x @ w.T, 2, dim=-1)
    torch.testing.assert_close(swiglu, torch.nn.functional.silu(g) * u)


def _keys(model=BASE, padded=64, scheme="local", extra=()):
    s = mapping.shapes_from_config(model, 50)
    qkv = (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim
    norm = {"local": (".layer_norm_norm.weight", "decoder.final_layernorm.norm.weight"),
            "te": (".layer_norm_weight", "decoder.final_layernorm.weight")}[scheme]
    h, L, E, f = s.hidden_size, s.num_layers, s.num_experts, s.moe_ffn_hidden_size
    keys = {
        "embedding.word_embeddings.weight": (padded, h),
        "decoder.layers.self_attention.linear_qkv" + norm[0]: (L, h),
        "decoder.layers.self_attention.linear_qkv.weight": (L, qkv, h),
        "decoder.layers.self_attention.linear_proj.weight": (L, h, h),
        "decoder.layers.mlp.router.weight": (L, E, h),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (L, E, 2 * f, h),
        "decoder.layers.mlp.experts.experts.linear_fc2.weight": (L, E, h, f),
        norm[1]: (h,),
    }
    if scheme == "te":
        keys["decoder.layers.pre_mlp_layernorm.weight"] = (L, h)
    else:
        keys["decoder.layers.mlp.linear_fc1.layer_norm_norm.weight"] = (L, h)
    if model.get("untie_embeddings_and_output_weights", True):
        keys["output_layer.weight"] = (padded, h)
    keys.update(dict(extra))
    return s, keys


@pytest.mark.parametrize("scheme", ["local", "te"])
def test_plan_covers_every_tensor_once(scheme):
    s, keys = _keys(scheme=scheme)
    specs = mapping.plan(s, keys)
    names = [x.name for x in specs]
    assert len(names) == len(set(names))
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    per_layer = 7 + 3 * s.num_experts
    assert len(specs) == 1 + s.num_layers * per_layer + 2
    assert {x.key for x in specs} == set(keys)
    emb = specs[0]
    assert emb.part == "rows" and emb.shape == (50, 16)  # padded rows trimmed to the tokenizer
    w1 = next(x for x in specs if x.name == "model.layers.1.block_sparse_moe.experts.2.w1.weight")
    assert (w1.index, w1.part, w1.shape) == ((1, 2), "gate", (8, 16))


def test_plan_gqa_shapes():
    model = {**BASE, "num_query_groups": 2}
    s, keys = _keys(model)
    specs = {x.name: x for x in mapping.plan(s, keys)}
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    assert specs["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    cfg = mapping.mixtral_config(model, s, 1, 2, "float32")
    assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4


def test_plan_tied_has_no_lm_head():
    model = {**BASE, "untie_embeddings_and_output_weights": False}
    s, keys = _keys(model)
    assert s.tied
    names = [x.name for x in mapping.plan(s, keys)]
    assert "lm_head.weight" not in names
    assert mapping.mixtral_config(model, s, 1, 2, "float32")["tie_word_embeddings"] is True


def test_plan_refuses_unmapped_and_misshaped_tensors():
    s, keys = _keys(extra={"decoder.layers.mlp.something_new.weight": (2, 16)})
    with pytest.raises(ExportError, match="no place for: decoder.layers.mlp.something_new"):
        mapping.plan(s, keys)
    s, keys = _keys()
    keys["decoder.layers.mlp.router.weight"] = (2, 5, 16)
    with pytest.raises(ExportError, match="router.weight has global shape"):
        mapping.plan(s, keys)
    s, keys = _keys(padded=40)
    with pytest.raises(ExportError, match="fewer than the tokenizer's 50"):
        mapping.plan(s, keys)


def test_apply_part_trims_padded_rows():
    s, keys = _keys()
    spec = mapping.plan(s, keys)[0]
    src = torch.arange(64.0).unsqueeze(1).expand(64, 16)
    assert mapping.apply_part(spec, s, src)[:, 0].tolist() == list(range(50))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("normalization", "LayerNorm", "no LayerNorm"),
        ("position_embedding_type", "learned_absolute", "no learned absolute positions"),
        ("num_experts", None, "dense model"),
        ("add_bias_linear", True, "no bias"),
        ("moe_shared_expert_intermediate_size", 64, "no shared experts"),
        ("moe_router_score_function", "sigmoid", "router is a softmax"),
        ("moe_router_enable_expert_bias", True, "no bias correction"),
        ("moe_router_pre_softmax", True, "renormalises the top-k"),
        ("moe_expert_capacity_factor", 1.25, "never drops tokens"),
        ("moe_layer_freq", [1, 0], "no dense layers between MoE layers"),
        ("rotary_interleaved", True, "not interleaved"),
        ("rotary_percent", 0.5, "whole head"),
    ],
)
def test_config_refusals(field, value, message):
    assert _mixtral_config_refusals(BASE) == []
    problems = _mixtral_config_refusals({**BASE, field: value})
    assert len(problems) == 1 and message in problems[0] and field in problems[0]


@pytest.mark.parametrize(
    "key,message",
    [
        ("decoder.layers.self_attention.linear_qkv.bias", "linear biases"),
        ("decoder.layers.self_attention.linear_qkv.layer_norm_bias", "LayerNorm biases"),
        ("embedding.position_embeddings.weight", "learned absolute positions"),
        ("decoder.layers.mlp.shared_experts.linear_fc1.weight", "shared experts"),
        ("decoder.layers.mlp.router.expert_bias", "bias-corrected router"),
        ("decoder.layers.mlp.linear_fc1.weight", "dense MLP layers"),
    ],
)
def test_key_refusals(key, message):
    _, keys = _keys()
    assert _mixtral_key_refusals(list(keys)) == []
    problems = _mixtral_key_refusals([*keys, key])
    assert len(problems) == 1 and message in problems[0] and key in problems[0]


def _mixtral_config_refusals(model: dict) -> list[str]:
    """Why a model config cannot be a Mixtral (families' rules; an unreadable layer pattern is
    a refusal too)."""
    from megatron_wsm.export import families
    from megatron_wsm.export.mapping import ExportError

    try:
        return families.refusals(model, families.MIXTRAL)
    except ExportError as e:
        return [str(e)]


def _mixtral_key_refusals(keys: list[str]) -> list[str]:
    """Why checkpoint tensors cannot be a Mixtral's (families' rules)."""
    from megatron_wsm.export import families

    return families.key_refusals(list(keys), families.MIXTRAL)


@pytest.mark.parametrize(
    "types,coeffs,expected",
    [
        ("aux_loss", 0.01, 0.01),
        ("seq_aux_loss", 0.002, 0.002),
        (["seq_aux_loss", "aux_loss"], [0.001, 0.03], 0.03),  # HF's loss is the aux_loss one
        (["seq_aux_loss", "global_aux_loss"], [0.001, 0.03], 0.001),
        ("none", 0.0, 0.0),
    ],
)
def test_router_aux_loss_coef_of_one_or_several_load_balancing_types(types, coeffs, expected):
    model = {
        **BASE,
        "moe_router_load_balancing_type": types,
        "moe_aux_loss_coeff": coeffs,
    }
    assert mapping.router_aux_loss_coef(model) == pytest.approx(expected)
    s, _ = _keys(model)
    cfg = mapping.mixtral_config(model, s, 1, 2, "float32")  # raised TypeError on lists
    assert cfg["router_aux_loss_coef"] == pytest.approx(expected)
