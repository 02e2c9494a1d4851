"""A Qwen2-MoE-style model trained by our trainer on 2 processes (TP=2 with sequence
parallelism: the shared-expert gate is replicated across TP ranks) exports with
``tools/export_hf.py`` as ``Qwen2MoeForCausalLM`` with logit parity (``check_parity``: logits
within 1e-4 in fp32, the same greedy continuation, the same held-out loss)."""

from __future__ import annotations

import pytest

from megatron_wsm.testing.families import QWEN2
from tests.distributed.test_export_families import exported_matches, tensors, train

pytest.importorskip("transformers")

pytestmark = pytest.mark.distributed


def test_qwen2_style_tp2_sp_exports_with_parity(data_cache, tmp_path):
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    # a dense middle layer (mlp_only_layers) as well
    flags = [*QWEN2, "--num-layers", "3", "--moe-layer-freq", "([1,0,1])", *layout]
    ckpt = train(flags, tmp_path, data_cache, nproc=2)
    hf = tmp_path / "hf"
    config = exported_matches(ckpt, hf, tmp_path, data_cache)
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is False
    assert config["qkv_bias"] is True and config["shared_expert_intermediate_size"] == 32
    weights = tensors(hf)
    # trained: the QKV bias moved away from its zero initialisation
    assert weights["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    assert weights["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert "model.layers.1.mlp.gate_proj.weight" in weights  # the dense layer
