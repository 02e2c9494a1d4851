"""A Qwen2-MoE-style model through the whole WSM chain on 2 processes, TP=2 with sequence
parallelism (the shared-expert gate is replicated across TP ranks): training with window saves
and the live merged readout, ``tools/merge_wsm.py`` (the gate and the QKV bias are the window's
weighted sums), ``tools/evaluate.py`` of the merge (the readout's loss), and
``tools/export_hf.py`` of the merge as ``Qwen2MoeForCausalLM`` with logit parity
(``check_parity``: logits within 1e-4 in fp32, the same greedy continuation, the same held-out
loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wsm.testing.families import QWEN2
from tests.distributed.test_export_families import INIT, exported_matches, tensors
from tests.distributed.test_model_families import RUN, SAME_EVAL
from tests.helpers import TINY_MODEL, run_pretrain, run_script

pytest.importorskip("transformers")

pytestmark = pytest.mark.distributed

LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
#: A dense middle layer (Qwen2-MoE's mlp_only_layers) as well.
FLAGS = [*QWEN2, "--num-layers", "3", "--moe-layer-freq", "([1,0,1])"]


# slow (≈ 60 s on a quiet machine, 120 s with the cores shared): the fast suite covers the
# Qwen2-MoE export parity and the gate's merge in one process (tests/unit/test_export_qwen2_moe.py).
@pytest.mark.slow
def test_qwen2_style_trains_merges_evaluates_and_exports(data_cache, tmp_path):
    result = run_pretrain(
        [*TINY_MODEL, *INIT, *FLAGS, *LAYOUT, *RUN, "--save", tmp_path / "run",
         "--data-cache-dir", data_cache],
        tmp_path / "train.json",
        nproc=2,
        timeout=600,
    )  # fmt: skip
    readout = next(r for r in result["wsm_readouts"] if r["iteration"] == 8)
    window = tmp_path / "run" / "wsm_window"
    inputs = [Path(p).name for p in readout["merge"]["inputs"]]
    merged = tmp_path / "merged"
    run_script(
        "tools/merge_wsm.py",
        ["--load-dir", window, "--method", "mean", "--save", merged, "--no-progress-bar"],
    )
    out = tmp_path / "eval.json"
    run_script(
        "tools/evaluate.py",
        ["--load", merged, *SAME_EVAL, "--data-cache-dir", data_cache, "--output-json", out],
    )
    assert json.loads(out.read_text())["loss"] == pytest.approx(readout["loss"], abs=1e-5)

    from megatron_wsm.testing.synthetic import load_reference

    states = [load_reference(window / n) for n in inputs]
    got = load_reference(merged)
    coefficients = readout["merge"]["coefficients"]
    for key in (
        "decoder.layers.2.mlp.shared_experts.gate_weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
    ):
        assert not torch.equal(states[0][key], states[-1][key]), key  # trained
        want = sum(c * s[key].double() for c, s in zip(coefficients, states))
        torch.testing.assert_close(got[key].double(), want, rtol=1e-6, atol=1e-7, msg=key)

    hf = tmp_path / "hf"
    config = exported_matches(merged, hf, tmp_path, data_cache)
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is False
    assert config["qkv_bias"] is True and config["shared_expert_intermediate_size"] == 32
    weights = tensors(hf)
    assert weights["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert "model.layers.1.mlp.gate_proj.weight" in weights  # the dense layer
