"""Model families from Megatron-LM's flags (issue 27 item 2): the --moe-layer-freq parser, the
flag → TransformerConfig mapping per family against Megatron-LM's own (recorded in
tests/data/megatron_lm/families/), the switch flags, the refusals and the manifest identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.checkpoint.manager import model_identity
from megatron_wsm.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from megatron_wsm.config.layer_freq import (
    MAX_PATTERN_LENGTH,
    LayerFreqError,
    moe_layer_pattern,
    parse_moe_layer_freq,
)
from megatron_wsm.model import (
    FusionKernels,
    activation_kwargs,
    build_transformer_config,
    local_keys_map,
)
from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.testing.families import REFERENCE_FAMILIES

REFERENCE = Path(__file__).parents[1] / "data" / "megatron_lm" / "families"

# ----------------------------------------------------------------------- --moe-layer-freq


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (1, 1),
        ("2", 2),
        (" 3 ", 3),
        ("([0]+[1]*3)", [0, 1, 1, 1]),
        ("[0]*3+[1]*5", [0, 0, 0, 1, 1, 1, 1, 1]),
        ("([1]*3+[0]*2)*2", [1, 1, 1, 0, 0, 1, 1, 1, 0, 0]),
        ("2*[1,0]", [1, 0, 1, 0]),
        ("[1, 0, 1]", [1, 0, 1]),
        ([0, 1], [0, 1]),
    ],
)
def test_moe_layer_freq_parses_megatron_lm_expressions(text, want):
    assert parse_moe_layer_freq(text) == want


def test_moe_layer_freq_of_the_deepseek_scripts():
    # DeepSeek-V2-Lite.sh: "([0]+[1]*26)"; DeepSeek-R1.sh: "[0]*3+[1]*58"
    assert parse_moe_layer_freq("([0]+[1]*26)") == [0] + [1] * 26
    assert parse_moe_layer_freq("[0]*3+[1]*58") == [0] * 3 + [1] * 58


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('true')", "not an integer"),
        ("[0]+__import__('os').getpid()", "only list literals"),
        ("[0]*10**9", "integer literal"),
        (f"[0]*{MAX_PATTERN_LENGTH + 1}", "longer than"),
        ("[0]*999999999999*999999999999", "longer than"),
        ("[2]", "0 \\(dense\\) or 1"),
        ("[0.5]", "0 \\(dense\\) or 1"),
        ("[True]", "0 \\(dense\\) or 1"),
        ("[-1]", "0 \\(dense\\) or 1"),
        ("[[0]]", "0 \\(dense\\) or 1"),
        ("[0]*True", "integer literal"),
        ("[0]*-1", "integer literal|negative"),
        ("[0]+1", "only list literals"),
        ("[0]-[1]", "only list literals"),
        ("[x for x in [0]]", "only list literals"),
        ("[0", "not a list expression"),
        ("(" * 300 + "[0]" + ")" * 300, "not a list expression|nested"),
        ("[0]" + "+[0]" * 5000, "longer than 10000|nested"),
        ("abc", "not an integer"),
        ("0", "≥ 1"),
        ("-2", "≥ 1"),
        (True, "not an integer"),
        (1.5, "not an integer"),
        ([0, 2], "0 or 1"),
    ],
)
def test_moe_layer_freq_refuses_anything_else_without_evaluating_it(text, message):
    with pytest.raises(LayerFreqError, match=message):
        parse_moe_layer_freq(text)


def test_moe_layer_freq_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    for text in (
        f"[0]+[__import__('pathlib').Path('{marker}').touch()]",
        f"[0]*(__import__('pathlib').Path('{marker}').touch() or 1)",
        f"[0]*len(open('{marker}', 'w').name)",
    ):
        with pytest.raises(LayerFreqError):
            parse_moe_layer_freq(text)
    assert not marker.exists()


def test_moe_layer_pattern_follows_megatron_core():
    assert moe_layer_pattern(1, 3) == [1, 1, 1]
    assert moe_layer_pattern(2, 5) == [1, 0, 1, 0, 1]  # layer 0 first, as in megatron-core
    assert moe_layer_pattern([0, 1, 1], 3) == [0, 1, 1]
    with pytest.raises(LayerFreqError, match="gives 2 layers but --num-layers is 3"):
        moe_layer_pattern([0, 1], 3)


def test_moe_layer_freq_flag_and_config():
    cfg, _ = parse_run_config(["--num-layers", "4", "--moe-layer-freq", "([0]+[1]*3)"])
    assert cfg.model.moe_layer_freq == [0, 1, 1, 1] and cfg.model.moe_layers() == [1, 2, 3]
    cfg.validate(world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="only list literals"):
        parse_run_config(["--moe-layer-freq", "[0]+open('x')"])
    bad, _ = parse_run_config(["--num-layers", "4", "--moe-layer-freq", "[0]*3"])
    with pytest.raises(ConfigError, match="gives 3 layers but --num-layers is 4"):
        bad.validate(world_size=1, cuda=False)
    none, _ = parse_run_config(["--num-layers", "2", "--moe-layer-freq", "[0]*2"])
    with pytest.raises(ConfigError, match="no layer an MoE layer"):
        none.validate(world_size=1, cuda=False)


# ------------------------------------------------- flag → TransformerConfig, per family

#: Where the same flags give another config here than in Megatron-LM (docs/model_families.md
#: "Defaults that differ"): Megatron-LM's value, ours.
DIFFERENT_DEFAULTS = {
    # Megatron-LM: softmax in the model's dtype unless --attention-softmax-in-fp32
    "attention_softmax_in_fp32": (False, True),
    # Megatron-LM: 0.1 each unless given
    "hidden_dropout": (0.1, 0.0),
    "attention_dropout": (0.1, 0.0),
    # Megatron-LM: the router in the model's dtype unless --moe-router-dtype
    "moe_router_dtype": (None, "fp32"),
    # Megatron-LM: allgather unless --moe-token-dispatcher-type
    "moe_token_dispatcher_type": ("allgather", "alltoall"),
    # Megatron-LM with --swiglu and no --ffn-hidden-size: int(4h·2/3 / 64)·64; ours 4h
    "ffn_hidden_size": (64, 128),
    "moe_ffn_hidden_size": (64, 128),
}
#: The fields each family's flags leave to those defaults (the rest must be equal).
EXPECTED_DIFFERENCES = {
    "mixtral": {
        "attention_softmax_in_fp32",
        "moe_router_dtype",
        "ffn_hidden_size",
        "moe_ffn_hidden_size",
    },
    "qwen3_moe": {
        "attention_softmax_in_fp32",
        "hidden_dropout",
        "attention_dropout",
        "moe_token_dispatcher_type",
        "ffn_hidden_size",
    },
    "deepseek": {
        "attention_softmax_in_fp32",
        "hidden_dropout",
        "attention_dropout",
        "moe_router_dtype",
        "moe_token_dispatcher_type",
    },
    "deepseek_v2_lite": {"moe_router_dtype"},
    "qwen2_moe": {
        "attention_softmax_in_fp32",
        "hidden_dropout",
        "attention_dropout",
        "ffn_hidden_size",
    },
}


def _family_config(name: str) -> RunConfig:
    flags = REFERENCE_FAMILIES[name]
    cfg, _ = parse_run_config([*TINY_MODEL, *flags])
    cfg.validate(world_size=1, cuda=False)
    return cfg


@pytest.mark.parametrize("family", sorted(REFERENCE_FAMILIES))
def test_family_config_equals_megatron_lms_but_for_the_documented_defaults(family):
    reference = json.loads((REFERENCE / f"{family}.json").read_text())
    cfg = _family_config(family)
    tc = build_transformer_config(cfg.model, cfg.parallel, FusionKernels())
    differ = {}
    for field, theirs in reference["transformer_config"].items():
        ours = (
            tc.activation_func.__name__ if field == "activation_func" else getattr(tc, field, None)
        )
        if ours != theirs:
            differ[field] = (theirs, ours)
    assert set(differ) == EXPECTED_DIFFERENCES[family], differ
    for field, values in differ.items():
        assert values == DIFFERENT_DEFAULTS[field], field
    gpt = reference["gpt_model"]
    assert type(tc).__name__ == gpt["config_class"]
    m = cfg.model
    assert m.position_embedding_type == gpt["position_embedding_type"]
    assert m.rotary_base == gpt["rotary_base"] and m.rotary_percent == gpt["rotary_percent"]
    assert (not m.untie_embeddings_and_output_weights) == gpt["share_embeddings_and_output_weights"]


def test_deepseek_family_maps_its_router_and_mla():
    tc = build_transformer_config(*_sections("deepseek"), FusionKernels())
    assert type(tc).__name__ == "MLATransformerConfig" and tc.multi_latent_attention
    assert (tc.q_lora_rank, tc.kv_lora_rank, tc.qk_head_dim, tc.v_head_dim) == (16, 16, 8, 8)
    assert tc.moe_layer_freq == [0, 1, 1] and tc.moe_shared_expert_intermediate_size == 32
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == (2, 1)
    assert tc.moe_router_load_balancing_type == "seq_aux_loss" and tc.rope_type == "yarn"


def _sections(name: str) -> tuple[ModelConfig, ParallelConfig]:
    cfg = _family_config(name)
    return cfg.model, cfg.parallel


def test_swiglu_and_gelu():
    assert activation_kwargs(True) == {
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
    }
    cfg, _ = parse_run_config(["--no-swiglu"])
    assert not cfg.model.swiglu and not cfg.model.no_swiglu  # folded into swiglu
    tc = build_transformer_config(cfg.model, cfg.parallel, FusionKernels())
    assert not tc.gated_linear_unit and tc.activation_func is torch.nn.functional.gelu
    default, _ = parse_run_config([])
    assert default.model.swiglu
    # a resumed GELU run keeps GELU without the flag; --swiglu turns it back on
    again, _ = parse_run_config([], base=cfg)
    assert not again.model.swiglu
    on, _ = parse_run_config(["--swiglu"], base=cfg)
    assert on.model.swiglu


def test_switch_flags_fold_into_one_field():
    cfg, _ = parse_run_config(
        [
            "--use-rotary-position-embeddings",
            "--disable-bias-linear",
            "--tie-embeddings-and-output-weights",
            "--untie-embeddings-and-output-weights",
        ]
    )
    m = cfg.model
    assert m.position_embedding_type == "rope" and not m.add_bias_linear
    assert not m.untie_embeddings_and_output_weights  # --tie-… wins over the default-on flag
    assert not (m.use_rotary_position_embeddings or m.disable_bias_linear)
    assert not m.tie_embeddings_and_output_weights
    biased, _ = parse_run_config(["--add-bias-linear"])
    assert biased.model.add_bias_linear and biased.model.add_qkv_bias  # as Megatron-LM syncs
    with pytest.raises(ConfigError, match="contradict"):
        parse_run_config(["--add-bias-linear", "--disable-bias-linear"])
    with pytest.raises(ConfigError, match="--no-position-embedding is deprecated"):
        parse_run_config(
            ["--no-position-embedding", "--position-embedding-type", "learned_absolute"]
        )


def test_group_query_attention_as_in_megatron_lm():
    mqa, _ = parse_run_config(["--group-query-attention"])  # Megatron-LM's default: 1 group
    assert mqa.model.query_groups == 1 and mqa.model.num_query_groups == 1
    # the shape is in num_query_groups alone: with or without the switch, one identity
    alone, _ = parse_run_config(["--num-query-groups", "2"])
    both, _ = parse_run_config(["--group-query-attention", "--num-query-groups", "2"])
    assert model_identity(alone.model.to_json(), 512) == model_identity(both.model.to_json(), 512)
    gqa, _ = parse_run_config(["--group-query-attention", "--num-query-groups", "2"])
    assert gqa.model.query_groups == 2
    tc = build_transformer_config(gqa.model, gqa.parallel, FusionKernels())
    assert tc.num_query_groups == 2
    assert ModelConfig().query_groups is None


@pytest.mark.parametrize(
    ("flags", "world", "message"),
    [
        (["--moe-router-enable-expert-bias"], 1, "needs --moe-router-score-function sigmoid"),
        (["--moe-router-group-topk", "1"], 1, "needs --moe-router-num-groups"),
        (["--moe-router-group-topk", "1", "--moe-router-num-groups", "3"], 1, "not divisible"),
        (["--moe-router-group-topk", "3", "--moe-router-num-groups", "2"], 1, "exceeds"),
        (["--multi-latent-attention", "--group-query-attention"], 1, "mutually exclusive"),
        (
            ["--multi-latent-attention", "--position-embedding-type", "none"],
            1,
            "needs --position-embedding-type rope",
        ),
        (["--num-query-groups", "3"], 1, "not divisible by --num-query-groups"),
        (
            ["--num-query-groups", "1", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
            2,
            "not divisible by TP",
        ),
        (
            ["--add-bias-linear", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
            2,
            "expert tensor parallel size 1",
        ),
        (["--moe-router-load-balancing-type", "sinkhorn"], 1, "--moe-aux-loss-coeff 0"),
        (["--moe-pad-expert-input-to-capacity"], 1, "needs --moe-expert-capacity-factor"),
    ],
)
def test_impossible_family_settings_are_refused_before_start(flags, world, message):
    cfg, _ = parse_run_config(flags)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=world, cuda=False)


def test_dense_biases_with_tp_are_allowed():
    # verified on CPU: dense TP=2 (+SP) with linear biases trains (the old refusal is gone)
    cfg, _ = parse_run_config(
        ["--num-experts", "0", "--add-bias-linear", "--tensor-model-parallel-size", "2"]
    )
    cfg.validate(world_size=2, cuda=False)


# ----------------------------------------------------------------- spec keys, identity


def test_local_keys_map_gives_transformer_engines_names():
    dense = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
             "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}  # fmt: skip
    assert local_keys_map(dense, moe=False, mla=False) == dense
    assert local_keys_map(dense, moe=True, mla=False) == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_"
    }
    mla_moe = local_keys_map({}, moe=True, mla=True)
    assert mla_moe == {
        "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
        "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    }
    mla_dense = local_keys_map({}, moe=False, mla=True)
    assert mla_dense["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"


def test_manifest_identity_of_old_checkpoints_is_kept():
    # a manifest written before the family flags: only the original shape fields
    old_keys = {
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "max_position_embeddings", "num_experts", "moe_ffn_hidden_size",
        "moe_router_topk", "position_embedding_type", "normalization",
        "untie_embeddings_and_output_weights", "vocab_size",
    }  # fmt: skip
    default = ModelConfig().to_json()
    old_manifest = {k: v for k, v in default.items() if k in old_keys}
    assert model_identity(old_manifest, 512) == model_identity(default, 512)
    qwen = model_identity(_family_config("qwen3_moe").model.to_json(), 512)
    assert qwen["qk_layernorm"] is True and qwen["kv_channels"] == 16
    assert "swiglu" not in qwen  # at its default
    gelu = ModelConfig(no_swiglu=True).to_json()
    assert model_identity(gelu, 512)["swiglu"] is False


def test_run_config_round_trip_keeps_family_fields_and_reads_old_manifests():
    cfg = _family_config("deepseek")
    back = RunConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert back == cfg and back.model.moe_layer_freq == [0, 1, 1]
    old = {"model": {"num_layers": 2, "hidden_size": 64}, "seq_length": 128}
    assert RunConfig.from_json(old).model.swiglu  # missing fields: their defaults
