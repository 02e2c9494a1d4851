"""HF export of each model family, trained by our trainer: logit parity with our model.

Mixtral-style (GQA, --kv-channels), Qwen3-MoE-style (qk-layernorm, a dense layer between MoE
layers), DeepSeek-V3-style (multi-latent attention, shared experts, a dense first layer, a
sigmoid router with expert bias and group-limited routing) and DeepSeek-V2-Lite-style models
train for 3 iterations, export with ``tools/export_hf.py`` and must give the logits of our
forward within 1e-4 (fp32), the same greedy continuation and the same held-out loss
(``check_parity`` of test_export_hf).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_wsm.testing.families import FAMILY_LAYOUTS
from tests.distributed.test_export_hf import check_parity, export, reference
from tests.helpers import TINY_MODEL, run_pretrain

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

pytestmark = pytest.mark.distributed

#: Larger initial weights than the default 0.02: router logits and attention scores far from
#: uniform, so a wrong expert choice or rotary convention shows in the logits.
INIT = ["--init-method-std", "0.1"]
MIXTRAL = [
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--kv-channels",
    "12",
    "--norm-epsilon",
    "1e-6",
    "--rotary-base",
    "500000",
]
QWEN3 = [
    "--num-layers",
    "3",
    "--qk-layernorm",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--kv-channels",
    "12",
    "--moe-layer-freq",
    "([1,0,1])",
    "--ffn-hidden-size",
    "40",
    "--moe-ffn-hidden-size",
    "16",
    "--norm-epsilon",
    "1e-6",
    "--rotary-base",
    "1000000",
]
DEEPSEEK = [
    "--num-layers", "3", "--multi-latent-attention", "--q-lora-rank", "16",
    "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4",
    "--v-head-dim", "8", "--qk-layernorm", "--moe-layer-freq", "([0]+[1]*2)",
    "--num-experts", "8", "--moe-ffn-hidden-size", "8", "--ffn-hidden-size", "48",
    "--moe-shared-expert-intermediate-size", "16", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4",
    "--moe-router-group-topk", "2", "--moe-router-topk", "4",
    "--moe-router-topk-scaling-factor", "2.5", "--moe-aux-loss-coeff", "0",
    "--norm-epsilon", "1e-6", "--rotary-base", "5000",
]  # fmt: skip

#: Megatron-LM's DeepSeek-V2-Lite model flags (examples/post_training/modelopt/conf/
#: deepseek-ai/DeepSeek-V2-Lite.sh, core_v0.16.1) at tiny sizes: MLA without query LoRA, YaRN,
#: softmax router (pre-softmax top-k), shared experts, a dense first layer. The routing scale is
#: 1.5 instead of the script's 1.0 so that the scale's mapping is seen.
DEEPSEEK_V2 = (
    "--num-layers 3 --disable-bias-linear --untie-embeddings-and-output-weights "
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu "
    "--multi-latent-attention --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 8 "
    "--v-head-dim 8 --qk-layernorm --kv-channels 16 --moe-layer-freq ([0]+[1]*2) "
    "--ffn-hidden-size 64 --moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 32 "
    "--moe-router-score-function softmax --moe-router-topk 2 "
    "--moe-router-topk-scaling-factor 1.5 --moe-router-pre-softmax "
    "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3 "
    "--rotary-percent 1.0 --rotary-base 10000 --rotary-scaling-factor 40 --mscale 0.707 "
    "--mscale-all-dim 0.707"
).split()


def train(flags: list[str], tmp, data_cache, nproc: int = 1):
    """3 iterations of the tiny model with ``flags``; its final checkpoint."""
    run_pretrain(
        [
            *TINY_MODEL,
            *INIT,
            *flags,
            "--train-iters",
            "3",
            "--save",
            tmp / "ckpt",
            "--data-cache-dir",
            data_cache,
        ],
        tmp / "train.json",
        nproc=nproc,
    )
    return tmp / "ckpt" / "iter_0000003"


def tensors(hf) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf / "model.safetensors")


TOKENS = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))


def exported_matches(ckpt, hf, tmp, data_cache) -> dict:
    """Export ``ckpt`` to ``hf``, check parity and that transformers used every tensor."""
    import transformers

    proc = export(ckpt, hf, "--data-cache-dir", data_cache)
    config = json.loads((hf / "config.json").read_text())
    assert f"({config['architectures'][0]})" in proc.stdout  # the report names the class
    _, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    check_parity(hf, reference(ckpt, tmp, data_cache, TOKENS), TOKENS)
    return config


def logits_with_config(hf, tmp, **changes) -> torch.Tensor:
    """The exported model's logits on :data:`TOKENS` with ``config.json`` fields changed."""
    import transformers

    other = tmp / "changed"
    shutil.copytree(hf, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **changes}))
    model = transformers.AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


# slow: the fast suite keeps one export per family (Mixtral in test_megatron_lm_scripts.py,
# Qwen3-MoE and DeepSeek-V3 below); these repeat them on the Megatron-LM scripts' flags.
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUTS))
def test_megatron_lm_family_flags_export_with_parity(family, data_cache, tmp_path):
    """The model flags of Megatron-LM's own scripts (megatron_wsm.testing.families: Mixtral,
    Qwen3-30B-A3B, DeepSeek-R1/V2-Lite, tiny sizes) → each family's own architecture."""
    ckpt = train(list(FAMILY_LAYOUTS[family][0]), tmp_path, data_cache)
    config = exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)
    want = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "deepseek": "DeepseekV3"}[family]
    assert config["architectures"] == [want + "ForCausalLM"]
    if family == "deepseek":  # YaRN (--rotary-scaling-factor 40, --mscale 0.707, ...)
        rope = config["rope_parameters"]
        assert (rope["rope_type"], rope["factor"], rope["mscale_all_dim"]) == ("yarn", 40, 0.707)


@pytest.fixture(scope="module")
def deepseek_ckpt(tmp_path_factory, data_cache):
    return train(DEEPSEEK, tmp_path_factory.mktemp("deepseek"), data_cache)


@pytest.mark.slow
def test_mixtral_style_gqa_kv_channels(data_cache, tmp_path):
    ckpt = train(MIXTRAL, tmp_path, data_cache)
    config = exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, 12)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-6, 500000.0)


def test_qwen3_style_qk_layernorm_and_dense_layer(data_cache, tmp_path):
    ckpt = train(QWEN3, tmp_path, data_cache)
    hf = tmp_path / "hf"
    config = exported_matches(ckpt, hf, tmp_path, data_cache)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is True
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, 12)
    names = set(tensors(hf))
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.self_attn.k_norm.weight" in names


@pytest.mark.slow
@pytest.mark.parametrize(
    "router",
    [
        ["--moe-router-pre-softmax"],
        ["--moe-router-load-balancing-type", "sinkhorn", "--moe-aux-loss-coeff", "0"],
    ],
    ids=["pre_softmax", "sinkhorn"],
)
def test_qwen3_style_unnormalised_routers(router, data_cache, tmp_path):
    """--moe-router-pre-softmax, and sinkhorn routing (outside training megatron-core's
    sinkhorn router is the same): top-k of the softmax, not renormalised (norm_topk_prob off)."""
    ckpt = train(["--qk-layernorm", *router], tmp_path, data_cache)
    config = exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)
    assert config["norm_topk_prob"] is False and config["mlp_only_layers"] == []


def test_deepseek_style_mla_shared_experts_dense_first(deepseek_ckpt, data_cache, tmp_path):
    hf = tmp_path / "hf"
    config = exported_matches(deepseek_ckpt, hf, tmp_path, data_cache)
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["first_k_dense_replace"], config["n_shared_experts"]) == (1, 2)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.5)
    weights = tensors(hf)
    # The router's expert bias moved during training and is exported as the score correction.
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0
    assert "model.layers.0.mlp.gate_proj.weight" in weights  # the dense first layer
    assert "model.layers.2.self_attn.kv_a_proj_with_mqa.weight" in weights
    # The parity above tells rotary conventions apart: DeepSeek-V3's non-interleaved rotary on
    # the same weights gives other logits (megatron-core MLA de-interleaves before rotating).
    ref = reference(deepseek_ckpt, tmp_path, data_cache, TOKENS)["logits"]
    assert (logits_with_config(hf, tmp_path, rope_interleave=False) - ref).abs().max() > 1e-3


def test_deepseek_refusals_write_nothing(deepseek_ckpt, data_cache, tmp_path):
    """What DeepSeek-V3 cannot express is refused before anything is written."""
    for field, value, message in (
        ("layernorm_epsilon", 1e-5, "always use 1e-06"),
        ("moe_layer_freq", "([0]+[1]+[0])", "dense after an MoE layer"),
    ):
        bad = tmp_path / field
        shutil.copytree(deepseek_ckpt, bad)
        manifest = json.loads((bad / "wsm_manifest.json").read_text())
        manifest["extra"]["run"]["model"][field] = value
        (bad / "wsm_manifest.json").write_text(json.dumps(manifest))
        proc = export(bad, tmp_path / f"hf_{field}", "--data-cache-dir", data_cache, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "cannot export as DeepSeek-V3" in proc.stderr
        assert not (tmp_path / f"hf_{field}").exists()


@pytest.mark.slow
def test_deepseek_v2_lite_flags(data_cache, tmp_path):
    """MLA with a softmax router exports as DeepSeek-V2 (its complex-pair rotary equals MLA's)."""
    ckpt = train(DEEPSEEK_V2, tmp_path, data_cache)
    config = exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert (config["topk_method"], config["routed_scaling_factor"]) == ("greedy", 1.5)
    assert config["q_lora_rank"] is None and config["rope_parameters"]["rope_type"] == "yarn"


@pytest.mark.slow
def test_deepseek_style_two_processes_ep2(data_cache, tmp_path):
    """A 2-process EP=2 checkpoint of the DeepSeek-style model exports with parity."""
    ckpt = train([*DEEPSEEK, "--expert-model-parallel-size", "2"], tmp_path, data_cache, nproc=2)
    exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUTS))
def test_megatron_lm_family_flags_two_processes(family, data_cache, tmp_path):
    """Each family in its 2-process layout of megatron_wsm.testing.families (Mixtral EP=2,
    Qwen3-MoE TP=2 with sequence parallelism, DeepSeek EP=2) exports with parity."""
    flags, layout, _ = FAMILY_LAYOUTS[family]
    ckpt = train([*flags, *layout], tmp_path, data_cache, nproc=2)
    exported_matches(ckpt, tmp_path / "hf", tmp_path, data_cache)


@pytest.mark.slow  # the same path runs fast in tests/unit/test_tokenizers.py
def test_hf_tokenizer_directory_run_exports_offline(tmp_path, monkeypatch):
    """A local Hugging Face tokenizer directory → tools/preprocess_data.py → training
    (--tokenizer-type HuggingFaceTokenizer, a Qwen3-MoE-style model) → export, offline: the
    exported AutoTokenizer encodes as the preprocessed data and the logits match ours."""
    from pydoc_data.topics import topics

    import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core)

    import transformers
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_wsm.cli.preprocess_data import main as preprocess
    from tests.helpers import ROOT

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    texts = [topics[k][:1000] for k in sorted(topics)[:60]]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
           str(ROOT / "tests/data/megatron_lm/preprocess/hf")]  # fmt: skip
    prefix = tmp_path / "data" / "docs"
    assert preprocess(["--input", str(docs), "--output-prefix", str(prefix), "--append-eod",
                       "--quiet", *tok]) == 0  # fmt: skip
    data = ["--data-path", f"{prefix}_text_document", "--split", "90,5,5"]
    cache = tmp_path / "cache"  # not used with --data-path: must stay unbuilt
    ckpt = train([*data, *tok, "--qk-layernorm"], tmp_path, cache)
    hf = tmp_path / "hf"
    export(ckpt, hf)
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    ds = IndexedDataset(f"{prefix}_text_document")
    for i in (0, 7, 59):
        assert auto(texts[i], add_special_tokens=False)["input_ids"] == ds[i].tolist()[:-1]
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == ds[0][-1]
    tokens = torch.tensor(ds[3][:40].astype("int64")).view(2, 20)
    # Logits and greedy tokens (check_parity's held-out loss compares against the trainer's
    # evaluation, whose sample count with --data-path is not the whole split it re-scores).
    ref = reference(ckpt, tmp_path, cache, tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(tokens).logits - ref["logits"]).abs().max() < 1e-4
        out = model.generate(tokens[:1, :8], max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert out[0, 8:].tolist() == ref["greedy"]
    assert not cache.exists()
