"""Choosing the HF architecture, its refusals, and the Qwen3-MoE / DeepSeek-V3 tensor plans.

The plans are checked on the checkpoint keys of real megatron-core models built by our builder
(one process, gloo): every key used, every HF tensor of the right shape. Logit parity through
the trainer and transformers is tests/distributed/test_export_families.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_wsm.export import families, mapping, plans
from megatron_wsm.export.mapping import ExportError
from megatron_wsm.testing.config import tiny_run_config

BASE = {
    "num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "num_experts": 8,
    "moe_ffn_hidden_size": 8, "ffn_hidden_size": 48, "moe_router_topk": 4,
    "normalization": "RMSNorm", "position_embedding_type": "rope", "layernorm_epsilon": 1e-6,
    "swiglu": True, "moe_layer_freq": 1, "untie_embeddings_and_output_weights": True,
}  # fmt: skip
QWEN3 = {**BASE, "qk_layernorm": True, "moe_layer_freq": "([1,0,1])"}
DEEPSEEK = {
    **BASE, "multi_latent_attention": True, "qk_layernorm": True, "moe_layer_freq": [0, 1, 1],
    "moe_shared_expert_intermediate_size": 16, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "moe_router_num_groups": 4,
    "moe_router_group_topk": 2, "moe_router_topk_scaling_factor": 2.5, "q_lora_rank": 16,
    "kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 8,
}  # fmt: skip
#: Megatron-LM's DeepSeek-V2-Lite router: softmax, top-k of all experts, scaled.
DEEPSEEK_V2 = {
    **DEEPSEEK, "moe_router_score_function": "softmax", "moe_router_pre_softmax": True,
    "moe_router_enable_expert_bias": False, "moe_router_num_groups": None,
    "moe_router_group_topk": None, "q_lora_rank": None,
}  # fmt: skip


def test_choose_family_follows_the_attention():
    assert families.choose_family(BASE) == families.MIXTRAL
    assert families.choose_family(QWEN3) == families.QWEN3_MOE
    assert families.choose_family(DEEPSEEK) == families.DEEPSEEK_V3
    assert families.choose_family(DEEPSEEK_V2) == families.DEEPSEEK_V2
    # MLA decides even without qk-layernorm (and is then refused, see below); its router
    # tells DeepSeek-V2 (softmax, megatron-core's default) from V3 (sigmoid).
    assert families.choose_family({**BASE, "multi_latent_attention": True}) == "deepseek_v2"


@pytest.mark.parametrize(
    ("freq", "want"),
    [
        (1, [True, True, True]),
        (2, [True, False, True]),
        (None, [True, True, True]),
        ([0, 1, 1], [False, True, True]),
        ("([0]+[1]*2)", [False, True, True]),
        ("3", [True, False, False]),
    ],
)
def test_moe_layer_pattern(freq, want):
    assert families.moe_layer_pattern({**BASE, "moe_layer_freq": freq}) == want


def test_moe_layer_pattern_refuses_without_evaluating():
    for bad in ("__import__('os').system('true')", "[0,1]", "[2,1,1]"):
        with pytest.raises(ExportError, match="moe-layer-freq"):
            families.moe_layer_pattern({**BASE, "moe_layer_freq": bad})
    assert families.moe_layer_pattern({**BASE, "num_experts": 0}) == [False] * 3


@pytest.mark.parametrize(
    "model", [BASE, QWEN3, DEEPSEEK, DEEPSEEK_V2], ids=["mixtral", "qwen3", "deepseek", "v2"]
)
def test_exportable_configs_have_no_refusals(model):
    assert families.refusals(model, families.choose_family(model)) == []


@pytest.mark.parametrize(
    ("base", "change", "message"),
    [
        # every family
        (BASE, {"normalization": "LayerNorm"}, "Mixtral has only RMSNorm"),
        (QWEN3, {"add_bias_linear": True}, "Qwen3-MoE's linear layers have no bias"),
        (QWEN3, {"add_qkv_bias": True}, "Qwen3-MoE's attention has no bias"),
        (DEEPSEEK, {"swiglu": False}, "DeepSeek-V3's MLPs are SwiGLU"),
        (QWEN3, {"position_embedding_type": "learned_absolute"}, "only rotary positions"),
        (QWEN3, {"rotary_percent": 0.5}, "rotates the whole head"),
        (DEEPSEEK, {"moe_expert_capacity_factor": 1.0}, "never drops tokens"),
        (QWEN3, {"num_experts": 0}, "a dense model is not a Qwen3-MoE"),
        # Mixtral
        (BASE, {"moe_layer_freq": 2}, "Mixtral has no dense layers between MoE layers"),
        (BASE, {"moe_router_pre_softmax": True}, "Mixtral renormalises"),
        # Mixtral and Qwen3-MoE
        (QWEN3, {"moe_router_score_function": "sigmoid"}, "Qwen3-MoE's router is a softmax"),
        (QWEN3, {"moe_router_enable_expert_bias": True}, "has no bias correction"),
        (QWEN3, {"moe_router_topk_scaling_factor": 2.0}, "does not scale routing weights"),
        (QWEN3, {"moe_router_num_groups": 2}, "no group-limited routing"),
        (BASE, {"moe_shared_expert_intermediate_size": 16}, "Mixtral has no shared experts"),
        (QWEN3, {"rotary_interleaved": True}, "not interleaved pairs"),
        # DeepSeek-V3
        (DEEPSEEK, {"moe_layer_freq": [1, 0, 1]}, "layer 1 is dense after an MoE layer"),
        (DEEPSEEK, {"qk_layernorm": False}, "without qk_layernorm"),
        (DEEPSEEK, {"moe_shared_expert_intermediate_size": None}, "has shared experts"),
        (DEEPSEEK, {"moe_shared_expert_intermediate_size": 12}, "not a multiple of the expert"),
        (DEEPSEEK, {"layernorm_epsilon": 1e-5}, "always use 1e-06"),
        (DEEPSEEK, {"rope_type": "llama3"}, "not a megatron-core MLA rotary type"),
        (DEEPSEEK, {"moe_router_group_topk": 1}, "by its top 4 experts"),
        (DEEPSEEK, {"moe_router_num_groups": 3}, "does not divide 8 experts"),
        (DEEPSEEK, {"moe_shared_expert_gate": True}, "no gated shared expert"),
        (DEEPSEEK, {"rotary_interleaved": True}, "rotary_interleaved with multi_latent"),
        # megatron-core's router at inference
        (BASE, {"moe_router_load_balancing_type": "sinkhorn"}, "unnormalised top-k"),
        (
            QWEN3,
            {"moe_router_load_balancing_type": "sinkhorn", "moe_router_topk": 1},
            "sigmoid of its logit",
        ),
        (QWEN3, {"moe_input_jitter_eps": 0.01}, "jitters the router input"),
        # DeepSeek-V2
        (DEEPSEEK_V2, {"moe_router_pre_softmax": False}, "pass --moe-router-pre-softmax"),
        (DEEPSEEK_V2, {"moe_router_enable_expert_bias": True}, "DeepSeek-V2's router has no"),
        (
            DEEPSEEK_V2,
            {"moe_router_num_groups": 4, "moe_router_group_topk": 2},
            "DeepSeek-V2 by its top 1",
        ),
        (DEEPSEEK_V2, {"moe_layer_freq": [1, 1, 0]}, "DeepSeek-V2 has dense layers only first"),
    ],
)
def test_each_refusal_names_its_reason(base, change, message):
    model = {**base, **change}
    problems = families.refusals(model, families.choose_family(model))
    assert len(problems) == 1 and message in problems[0], problems


def test_mla_rope_parameters():
    """MLA's rotary: YaRN by default (factor 1 = plain RoPE); megatron-core's cos/sin factor
    mscale-ratio given explicitly, the softmax term through mscale_all_dim."""
    assert plans.mla_rope_parameters({**DEEPSEEK, "rotary_base": 5000}) == {
        "rope_type": "default",
        "rope_theta": 5000.0,
    }
    yarn = {**DEEPSEEK, "rotary_scaling_factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    rope = plans.mla_rope_parameters(yarn)
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == (
        "yarn",
        40.0,
        4096,
    )
    assert (rope["beta_fast"], rope["beta_slow"], rope["mscale_all_dim"]) == (32.0, 1.0, 0.707)
    assert rope["attention_factor"] == 1.0  # equal mscales cancel
    rope = plans.mla_rope_parameters({**yarn, "mscale": 1.0, "mscale_all_dim": 0.0})
    assert rope["attention_factor"] == pytest.approx(0.1 * math.log(40.0) + 1.0)
    rope = plans.mla_rope_parameters({**yarn, "rope_type": "rope"})
    assert rope["rope_type"] == "default"
    assert families.refusals(yarn, families.DEEPSEEK_V3) == []


def test_qwen3_sinkhorn_router_is_its_unnormalised_top_k():
    """megatron-core's sinkhorn router outside training: top-k of the softmax, as is."""
    model = {**QWEN3, "moe_router_load_balancing_type": "sinkhorn"}
    assert families.refusals(model, families.QWEN3_MOE) == []
    shapes = plans.family_shapes(model, 500, families.QWEN3_MOE)
    assert plans.hf_config(model, shapes, 1, 2, "float32")["norm_topk_prob"] is False
    assert plans.hf_config(QWEN3, shapes, 1, 2, "float32")["norm_topk_prob"] is True


def test_check_exportable_lists_every_reason_at_once():
    model = {**DEEPSEEK, "layernorm_epsilon": 1e-5, "moe_layer_freq": [1, 0, 1]}
    with pytest.raises(ExportError) as err:
        families.check_exportable(model, ["decoder.layers.0.self_attention.linear_proj.bias"])
    text = str(err.value)
    assert text.startswith("cannot export as DeepSeek-V3: ")
    assert "1e-06" in text and "dense after an MoE layer" in text and "linear biases" in text
    softmax = {**DEEPSEEK, "moe_router_score_function": "softmax"}
    assert "DeepSeek-V3's router is a sigmoid" in families.refusals(softmax, "deepseek_v3")[0]
    assert families.check_exportable(QWEN3, ["decoder.layers.0.mlp.router.weight"]) == "qwen3_moe"


def test_key_refusals_per_family():
    bias = "decoder.layers.mlp.router.expert_bias"
    shared = "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"
    assert families.key_refusals([bias, shared], families.DEEPSEEK_V3) == []
    problems = families.key_refusals([bias, shared], families.QWEN3_MOE)
    assert len(problems) == 2 and "shared experts" in problems[0]
    assert "bias-corrected router" in problems[1]
    linear = "decoder.layers.self_attention.linear_qkv.bias"
    assert "linear biases" in families.key_refusals([linear], families.DEEPSEEK_V3)[0]
    gate = "decoder.layers.1.mlp.shared_experts.gate_weight"
    assert "gated shared expert" in families.key_refusals([gate], families.DEEPSEEK_V3)[0]
    assert families.key_refusals([shared], families.DEEPSEEK_V2) == []
    assert "bias-corrected" in families.key_refusals([bias], families.DEEPSEEK_V2)[0]


# -- plans on real megatron-core models ------------------------------------------------------------


QWEN3_FLAGS = [
    "--num-layers", "3", "--qk-layernorm", "--group-query-attention", "--num-query-groups", "2",
    "--kv-channels", "12", "--moe-layer-freq", "([1,0,1])", "--ffn-hidden-size", "40",
    "--moe-ffn-hidden-size", "16",
]  # fmt: skip
DEEPSEEK_FLAGS = [
    "--num-layers", "3", "--multi-latent-attention", "--q-lora-rank", "16",
    "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4",
    "--v-head-dim", "8", "--qk-layernorm", "--moe-layer-freq", "([0]+[1]*2)",
    "--num-experts", "8", "--moe-ffn-hidden-size", "8", "--ffn-hidden-size", "48",
    "--moe-shared-expert-intermediate-size", "16", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4",
    "--moe-router-group-topk", "2", "--moe-router-topk", "4", "--norm-epsilon", "1e-6",
]  # fmt: skip


DEEPSEEK_V2_FLAGS = [
    "--num-layers", "3", "--multi-latent-attention", "--kv-lora-rank", "16",
    "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8", "--qk-layernorm",
    "--moe-layer-freq", "([0]+[1]*2)", "--moe-ffn-hidden-size", "8", "--ffn-hidden-size", "48",
    "--moe-shared-expert-intermediate-size", "16", "--moe-router-pre-softmax",
    "--moe-router-topk-scaling-factor", "1.5", "--norm-epsilon", "1e-6",
]  # fmt: skip


def checkpoint_keys(flags: list[str]) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The model config and the global checkpoint keys/shapes of our builder's model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_wsm.model import FusionKernels, build_gpt_model, build_transformer_config

    cfg = tiny_run_config(*flags)
    cfg.validate(world_size=1, cuda=False)
    model = build_gpt_model(build_transformer_config(cfg.model, cfg.parallel, FusionKernels()),
                            cfg.model, 512)  # fmt: skip
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    keys = {
        sh.key: tuple(sh.global_shape)
        for sh in nested_values(sharded)
        if isinstance(sh, ShardedTensor) and sh.data is not None and sh.data.is_floating_point()
    }
    return cfg.model.to_json(), keys


@pytest.mark.parametrize(
    ("flags", "family", "tensors"),
    [
        ([], families.MIXTRAL, 1 + 2 * (7 + 4 * 3) + 2),
        # layers 0, 2 MoE (4 experts), layer 1 dense: 8 attention/norm tensors per layer
        (QWEN3_FLAGS, families.QWEN3_MOE, 1 + 3 * 8 + 2 * (1 + 4 * 3) + 3 + 2),
        # 9 MLA/norm tensors per layer; MoE layers: gate, bias, 8 experts × 3, shared × 3
        (DEEPSEEK_FLAGS, families.DEEPSEEK_V3, 1 + 3 * 9 + 2 * (2 + 8 * 3 + 3) + 3 + 2),
        # no query LoRA (q_proj): 7 MLA/norm tensors per layer; no router bias
        (DEEPSEEK_V2_FLAGS, families.DEEPSEEK_V2, 1 + 3 * 7 + 2 * (1 + 4 * 3 + 3) + 3 + 2),
    ],
    ids=["mixtral", "qwen3", "deepseek", "deepseek_v2"],
)
def test_plan_uses_every_key_of_a_real_model(megatron_world, flags, family, tensors):
    model, keys = checkpoint_keys(flags)
    assert families.check_exportable(model, list(keys)) == family
    shapes = plans.family_shapes(model, 500, family)
    specs = plans.plan(shapes, keys)
    assert len(specs) == tensors
    assert len({s.name for s in specs}) == len(specs)
    assert {s.key for s in specs if s.key} == set(keys)
    for spec in specs:  # the transform gives the planned shape from the stored global slice
        if spec.key:
            shape = keys[spec.key][len(spec.index) :]
            out = mapping.apply_part(spec, shapes, torch.zeros(shape))
            assert tuple(out.shape) == spec.shape, spec


def test_deepseek_plan_maps_mla_and_router(megatron_world):
    model, keys = checkpoint_keys(DEEPSEEK_FLAGS)
    shapes = plans.family_shapes(model, 500, families.DEEPSEEK_V3)
    specs = {s.name: s for s in plans.plan(shapes, keys)}
    a = "model.layers.1.self_attn."
    assert specs[a + "q_a_proj.weight"].key.endswith("1.self_attention.linear_q_down_proj.weight")
    assert specs[a + "q_a_layernorm.weight"].key.endswith("linear_q_up_proj.layer_norm_weight")
    assert specs[a + "kv_a_proj_with_mqa.weight"].shape == (16 + 4, 32)
    assert specs[a + "kv_b_proj.weight"].shape == (4 * (8 + 8), 16)
    assert specs[a + "o_proj.weight"].shape == (32, 4 * 8)
    bias = specs["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.key == "decoder.layers.1.mlp.router.expert_bias"
    assert "model.layers.0.mlp.gate.weight" not in specs  # dense first layer
    assert specs["model.layers.0.mlp.gate_proj.weight"].shape == (48, 32)
    assert specs["model.layers.2.mlp.shared_experts.up_proj.weight"].shape == (16, 32)
    config = plans.hf_config(model, shapes, 1, 2, "float32")
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] == 2
    assert (config["n_group"], config["topk_group"], config["norm_topk_prob"]) == (4, 2, True)
    assert config["rope_interleave"] is True and config["q_lora_rank"] == 16


def test_deepseek_v2_config(megatron_world):
    model, keys = checkpoint_keys(DEEPSEEK_V2_FLAGS)
    shapes = plans.family_shapes(model, 500, families.DEEPSEEK_V2)
    specs = {s.name: s for s in plans.plan(shapes, keys)}
    assert specs["model.layers.0.self_attn.q_proj.weight"].shape == (4 * (8 + 4), 32)
    assert not any("e_score_correction_bias" in name for name in specs)
    config = plans.hf_config(model, shapes, 1, 2, "float32")
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert (config["topk_method"], config["routed_scaling_factor"]) == ("greedy", 1.5)
    assert (config["q_lora_rank"], config["first_k_dense_replace"]) == (None, 1)
    assert "rope_interleave" not in config and config["norm_topk_prob"] is False


def test_deepseek_without_expert_bias_gets_a_zero_correction(megatron_world):
    flags = [f for f in DEEPSEEK_FLAGS if f != "--moe-router-enable-expert-bias"]
    model, keys = checkpoint_keys(flags)
    shapes = plans.family_shapes(model, 500, families.DEEPSEEK_V3)
    specs = {s.name: s for s in plans.plan(shapes, keys)}
    bias = specs["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert (bias.key, bias.part) == ("", "zeros")
    assert mapping.apply_part(bias, shapes, torch.empty(0)).tolist() == [0.0] * 8


def test_plan_refuses_a_tensor_without_place(megatron_world):
    model, keys = checkpoint_keys(QWEN3_FLAGS)
    shapes = plans.family_shapes(model, 500, families.QWEN3_MOE)
    with pytest.raises(ExportError, match="Qwen3-MoE has no place for: extra.weight"):
        plans.plan(shapes, {**keys, "extra.weight": (3,)})
    wrong = dataclasses.replace(shapes, head_dim=8)
    with pytest.raises(ExportError, match="global shape"):
        plans.plan(wrong, keys)


def test_layer_source_finds_per_layer_and_stacked_keys():
    per_layer = {"decoder.layers.2.mlp.router.weight": (4, 8)}
    stacked = {"decoder.layers.mlp.router.weight": (3, 4, 8)}
    assert plans.layer_source(per_layer, 2, 3, "router", (4, 8)) == (
        "decoder.layers.2.mlp.router.weight",
        (),
    )
    assert plans.layer_source(stacked, 2, 3, "router", (4, 8)) == (
        "decoder.layers.mlp.router.weight",
        (2,),
    )
    with pytest.raises(ExportError, match="twice"):
        plans.layer_source({**per_layer, **stacked}, 2, 3, "router", (4, 8))
    with pytest.raises(ExportError, match="no router tensor for layer 1"):
        plans.layer_source(per_layer, 1, 3, "router", (4, 8))


# -- tokenizers of --tokenizer-type runs -----------------------------------------------------------


def test_export_tokenizer_of_a_hugging_face_directory(tmp_path):
    """A HuggingFaceTokenizer run's tokenizer is rebuilt from its flags and written so that
    AutoTokenizer encodes the same ids; NullTokenizer (no text tokenizer) is refused."""
    from pathlib import Path

    from megatron_wsm.data.tokenizers import build_tokenizer
    from megatron_wsm.export import tokenizer as export_tok

    hf_dir = Path(__file__).parents[1] / "data" / "megatron_lm" / "preprocess" / "hf"
    cfg = tiny_run_config("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir)
    tok = export_tok.megatron_tokenizer(cfg.data)
    ours = build_tokenizer("HuggingFaceTokenizer", str(hf_dir))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (420, ours.eod, ours.eod)
    tok.write(tmp_path)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x + 1  # Grüße"
    assert auto(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)

    null = tiny_run_config("--tokenizer-type", "NullTokenizer", "--vocab-size", 100)
    with pytest.raises(ExportError, match="NullTokenizer is not written for transformers"):
        export_tok.megatron_tokenizer(null.data)
