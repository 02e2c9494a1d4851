"""Qwen1.5/Qwen2-MoE-style models: ``--moe-shared-expert-gate`` and ``--add-qkv-bias`` reach
megatron-core, the export writes ``Qwen2MoeForCausalLM`` with fp32 logit parity, what Qwen2-MoE
cannot express is refused, and the WSM merge averages the gate like every float tensor.

Parity here is in one process: our builder's model (random weights, biases and gate included)
is saved with megatron-core's ``dist_checkpointing``, read back through the export's reader and
tensor plan, written as safetensors + ``config.json`` and loaded by transformers.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.export import families, mapping, plans
from megatron_wsm.export.mapping import ExportError
from megatron_wsm.testing.config import tiny_run_config
from tests.unit.test_export_families import BASE, QWEN3

transformers = pytest.importorskip("transformers")

#: A Qwen2-MoE config (``ModelConfig.to_json()`` fields): gated shared expert, QKV bias,
#: Qwen1.5-MoE's pre-softmax top-k router, a dense middle layer.
QWEN2 = {
    **BASE, "moe_layer_freq": "([1,0,1])", "moe_shared_expert_intermediate_size": 24,
    "moe_shared_expert_gate": True, "add_qkv_bias": True, "moe_router_pre_softmax": True,
}  # fmt: skip

#: The same as trainer flags (tiny sizes; GQA with its own head width).
QWEN2_FLAGS = [
    "--num-layers", "3", "--group-query-attention", "--num-query-groups", "2",
    "--kv-channels", "12", "--add-qkv-bias", "--moe-layer-freq", "([1,0,1])",
    "--ffn-hidden-size", "40", "--moe-ffn-hidden-size", "16",
    "--moe-shared-expert-intermediate-size", "24", "--moe-shared-expert-gate",
    "--moe-router-pre-softmax", "--norm-epsilon", "1e-6", "--rotary-base", "1000000",
    "--init-method-std", "0.1",
]  # fmt: skip
VOCAB = 500  #: the "tokenizer" size; the model pads its embedding to 512 rows


def test_flags_reach_megatron_core():
    from megatron_wsm.model import FusionKernels, build_transformer_config

    cfg, _ = parse_run_config(QWEN2_FLAGS)
    cfg.validate(world_size=1, cuda=False)
    tc = build_transformer_config(cfg.model, cfg.parallel, FusionKernels())
    assert tc.moe_shared_expert_gate and tc.add_qkv_bias and not tc.add_bias_linear
    assert tc.moe_shared_expert_intermediate_size == 24
    default, _ = parse_run_config([])
    assert not default.model.moe_shared_expert_gate  # off unless given, as in Megatron-LM
    # a shape field: the gate adds a tensor, so it enters the checkpoint identity when set
    from megatron_wsm.checkpoint.manager import model_identity

    assert model_identity(cfg.model.to_json(), 512)["moe_shared_expert_gate"] is True
    assert "moe_shared_expert_gate" not in model_identity(default.model.to_json(), 512)


def test_choose_family_and_no_refusals():
    assert families.choose_family(QWEN2) == families.QWEN2_MOE
    assert families.refusals(QWEN2, families.QWEN2_MOE) == []
    no_bias = {**QWEN2, "add_qkv_bias": False, "moe_router_pre_softmax": False}
    assert families.refusals(no_bias, families.choose_family(no_bias)) == []
    # megatron-core builds no gate without shared experts: the flag alone changes nothing
    gate_only = {**BASE, "moe_shared_expert_gate": True}
    assert families.choose_family(gate_only) == families.MIXTRAL
    assert families.refusals(gate_only, families.MIXTRAL) == []
    # an ungated shared expert is no Qwen2-MoE (and no Mixtral / Qwen3-MoE either)
    ungated = {**QWEN2, "moe_shared_expert_gate": False}
    assert families.choose_family(ungated) == families.MIXTRAL
    assert any("no shared experts" in p for p in families.refusals(ungated, families.MIXTRAL))
    # MLA decides first: DeepSeek has no gated shared expert
    mla = {**QWEN2, "multi_latent_attention": True}
    assert families.choose_family(mla) == families.DEEPSEEK_V2
    assert families.ARCHITECTURES[families.QWEN2_MOE] == "Qwen2MoeForCausalLM"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_router_score_function": "sigmoid"}, "Qwen2-MoE's router is a softmax"),
        ({"qk_layernorm": True}, "Qwen2-MoE has no query/key norm"),
        ({"add_bias_linear": True}, "Qwen2-MoE's linear layers have no bias"),
        ({"moe_router_topk_scaling_factor": 2.0}, "does not scale routing weights"),
        ({"moe_router_num_groups": 2}, "no group-limited routing"),
        ({"normalization": "LayerNorm"}, "Qwen2-MoE has only RMSNorm"),
        ({"rotary_interleaved": True}, "not interleaved pairs"),
        ({"moe_expert_capacity_factor": 1.0}, "never drops tokens"),
        ({"moe_input_jitter_eps": 0.01}, "jitters the router input"),
    ],
)
def test_each_refusal_names_its_reason(change, message):
    model = {**QWEN2, **change}
    problems = families.refusals(model, families.choose_family(model))
    assert len(problems) == 1 and message in problems[0], problems


def test_refusals_of_a_forced_family_and_keys():
    assert "every Qwen2-MoE MoE layer has a shared expert" in " ".join(
        families.refusals(QWEN3 | {"qk_layernorm": False}, families.QWEN2_MOE)
    )
    ungated = {**QWEN2, "moe_shared_expert_gate": False}
    assert "pass --moe-shared-expert-gate" in families.refusals(ungated, families.QWEN2_MOE)[0]
    gate = "decoder.layers.0.mlp.shared_experts.gate_weight"
    shared = "decoder.layers.0.mlp.shared_experts.linear_fc1.weight"
    qkv_bias = "decoder.layers.self_attention.linear_qkv.bias"
    assert families.key_refusals([gate, shared, qkv_bias], families.QWEN2_MOE) == []
    # the other families still refuse each (unchanged)
    mixtral = families.key_refusals([gate, shared, qkv_bias], families.MIXTRAL)
    assert [p.split(" (")[0] for p in mixtral] == [
        "checkpoint has linear biases",
        "checkpoint has a gated shared expert",
        "checkpoint has shared experts",
    ]
    bad = families.key_refusals(
        ["decoder.layers.self_attention.linear_proj.bias", "decoder.layers.mlp.router.expert_bias"],
        families.QWEN2_MOE,
    )
    assert len(bad) == 2 and "linear biases" in bad[0] and "bias-corrected router" in bad[1]
    with pytest.raises(ExportError, match="cannot export as Qwen2-MoE: .*query/key norm"):
        families.check_exportable({**QWEN2, "qk_layernorm": True}, [gate])


def test_sinkhorn_router_maps_to_unnormalised_top_k():
    model = {**QWEN2, "moe_router_pre_softmax": False, "moe_router_load_balancing_type": "sinkhorn"}
    assert families.refusals(model, families.QWEN2_MOE) == []
    shapes = plans.family_shapes(model, VOCAB, families.QWEN2_MOE)
    assert plans.hf_config(model, shapes, 1, 2, "float32")["norm_topk_prob"] is False


def test_split_qkv_splits_the_bias_like_the_weight_rows():
    heads, groups, hd, h = 4, 2, 3, 5
    weight = torch.randn((heads + 2 * groups) * hd, h)
    bias = torch.randn((heads + 2 * groups) * hd)
    for w_part, b_part in zip(
        mapping.split_qkv(weight, heads, groups, hd), mapping.split_qkv(bias, heads, groups, hd)
    ):
        # the bias travels with its row: split [W | b] and compare
        joined = mapping.split_qkv(torch.cat([weight, bias[:, None]], 1), heads, groups, hd)
        assert any(torch.equal(j, torch.cat([w_part, b_part[:, None]], 1)) for j in joined)


# -- a real megatron-core model: plan, parity, merge -------------------------------------------


def build_model(flags: list[str], seed: int = 0):
    """Our builder's model for ``flags``, every parameter perturbed (biases and the gate are
    zero or near it at initialisation: a wrong mapping must show in the logits)."""
    from megatron_wsm.model import FusionKernels, build_gpt_model, build_transformer_config

    cfg = tiny_run_config(*flags)
    cfg.validate(world_size=1, cuda=False)
    tc = build_transformer_config(cfg.model, cfg.parallel, FusionKernels())
    model = build_gpt_model(tc, cfg.model, 512)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("bias", "gate_weight")) else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return cfg, model.eval()


def save(model, path) -> dict[str, tuple[int, ...]]:
    """``dist_checkpointing`` save of the model; its float tensors' global shapes."""
    from megatron.core import dist_checkpointing

    from megatron_wsm.export.reader import CheckpointReader

    path.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    return CheckpointReader(path).model_tensors()


def export_dir(cfg, ckpt, out) -> dict:
    """The HF directory of ``ckpt`` through the export's reader, plan and config."""
    from safetensors.torch import save_file

    from megatron_wsm.export.reader import CheckpointReader

    model = cfg.model.to_json()
    reader = CheckpointReader(ckpt)
    keys = reader.model_tensors()
    family = families.check_exportable(model, list(keys))
    shapes = plans.family_shapes(model, VOCAB, family)
    tensors = {
        spec.name: mapping.apply_part(spec, shapes, reader.read(spec.key, spec.index)).clone()
        for spec in plans.plan(shapes, keys)
    }
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = plans.hf_config(model, shapes, 1, 2, "float32")
    (out / "config.json").write_text(json.dumps(config))
    return config


TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def our_logits(model) -> torch.Tensor:
    pos = torch.arange(TOKENS.shape[1]).unsqueeze(0).expand_as(TOKENS)
    with torch.no_grad():
        return model(TOKENS, pos, attention_mask=None).float()[..., :VOCAB]


@pytest.mark.parametrize(
    ("router", "norm_topk_prob"),
    [(["--moe-router-pre-softmax"], False), ([], True)],
    ids=["pre_softmax", "renormalised"],
)
def test_export_has_logit_parity(megatron_world, tmp_path, router, norm_topk_prob):  # noqa: F811
    flags = [f for f in QWEN2_FLAGS if f != "--moe-router-pre-softmax"] + router
    cfg, model = build_model(flags)
    keys = save(model, tmp_path / "ckpt")
    assert any(k.endswith("shared_experts.gate_weight") for k in keys)
    config = export_dir(cfg, tmp_path / "ckpt", tmp_path / "hf")
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["model_type"] == "qwen2_moe" and config["qkv_bias"] is True
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is norm_topk_prob
    assert (config["shared_expert_intermediate_size"], config["head_dim"]) == (24, 12)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        theirs = hf.eval()(TOKENS).logits
    ours = our_logits(model)
    err = (theirs - ours).abs().max().item()
    assert err < 1e-4, f"max abs logit difference {err}"
    # the gate and the QKV bias matter: without either the logits are others
    layer = hf.model.layers[0]
    for param in (layer.mlp.shared_expert_gate.weight, layer.self_attn.q_proj.bias):
        kept = param.detach().clone()
        with torch.no_grad():
            param.zero_()
            assert (hf(TOKENS).logits - ours).abs().max() > 1e-3
            param.copy_(kept)
    # so does the router's renormalisation (norm_topk_prob)
    for moe_layer in (0, 2):
        hf.model.layers[moe_layer].mlp.gate.norm_topk_prob = not norm_topk_prob
    with torch.no_grad():
        assert (hf(TOKENS).logits - ours).abs().max() > 1e-3


def test_plan_uses_every_key_without_qkv_bias(megatron_world, tmp_path):  # noqa: F811
    flags = [f for f in QWEN2_FLAGS if f != "--add-qkv-bias"]
    cfg, model = build_model(flags)
    keys = save(model, tmp_path / "ckpt")
    model_json = cfg.model.to_json()
    shapes = plans.family_shapes(model_json, VOCAB, families.QWEN2_MOE)
    specs = plans.plan(shapes, keys)
    # 6 attention/norm tensors per layer; MoE layers: router, 4 experts × 3, shared × 3, gate
    assert len(specs) == 1 + 3 * 6 + 2 * (1 + 4 * 3 + 3 + 1) + 3 + 2
    assert {s.key for s in specs} == set(keys)
    assert plans.hf_config(model_json, shapes, 1, 2, "float32")["qkv_bias"] is False
    # a config saying "QKV bias" for a checkpoint without one is refused, not invented
    biased = plans.family_shapes({**model_json, "add_qkv_bias": True}, VOCAB, "qwen2_moe")
    with pytest.raises(ExportError, match="no qkv_bias tensor for layer 0"):
        plans.plan(biased, keys)


def test_merge_averages_the_gate(megatron_world, tmp_path):  # noqa: F811
    """The WSM merge is generic over float tensors: the shared-expert gate (and the QKV bias)
    of two checkpoints come out as their weighted average."""
    from megatron_wsm.export.reader import CheckpointReader
    from megatron_wsm.merge import merge_checkpoints

    inputs = []
    for i in (1, 2):
        _, model = build_model(QWEN2_FLAGS, seed=i)
        inputs.append(tmp_path / f"iter_000000{i}")
        save(model, inputs[-1])
    report = merge_checkpoints(inputs, [0.25, 0.75], tmp_path / "merged", allow_no_manifest=True)
    gate = "decoder.layers.0.mlp.shared_experts.gate_weight"
    bias = "decoder.layers.0.self_attention.linear_qkv.bias"
    assert gate in report.averaged_keys and bias in report.averaged_keys
    a, b = (CheckpointReader(p) for p in inputs)
    merged = CheckpointReader(tmp_path / "merged")
    for key in (gate, bias):
        want = 0.25 * a.read(key) + 0.75 * b.read(key)
        torch.testing.assert_close(merged.read(key), want, atol=1e-6, rtol=1e-6)
