"""WSM on each model family built from Megatron-LM's flags (issue 27 items 2-3): a tiny model of
each trains on 2 processes with window saves and the live merged readout, the window is merged
by ``tools/merge_wsm.py`` and evaluated by ``tools/evaluate.py`` (equal to the readout), and the
MoE violation metrics name the MoE layers only, by their real layer index.

The family flags follow Megatron-LM's own scripts (core_v0.16.1): Mixtral
(``examples/mixtral/train_mixtral_8x7b_distributed.sh``), Qwen3-MoE
(``examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh``) and DeepSeek-V2-Lite / V3
(``.../conf/deepseek-ai/DeepSeek-V2-Lite.sh``, ``DeepSeek-R1.sh``), with tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wsm.testing.families import FAMILY_LAYOUTS as FAMILIES
from megatron_wsm.testing.families import REFERENCE_FAMILIES
from tests.helpers import TINY_MODEL, losses, run_pretrain, run_script

pytestmark = pytest.mark.distributed

#: Window saves every 2 iterations over 4 (3 checkpoints), eval (and readout) every 4.
RUN = [
    "--train-iters",
    "8",
    "--lr",
    "3e-3",
    "--lr-decay-style",
    "stable",
    "--wsm-interval",
    "2",
    "--wsm-window",
    "4",
    "--eval-interval",
    "4",
    "--wsm-eval-methods",
    "mean",
]
SAME_EVAL = ["--eval-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2"]


def _scalar_tags(tb: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def _check_family(name: str, data_cache: str, tmp_path: Path) -> None:
    flags, layout, moe_layers = FAMILIES[name]
    tb = tmp_path / "tb"
    result = run_pretrain(
        [
            *TINY_MODEL,
            *flags,
            *layout,
            *RUN,
            "--save",
            tmp_path / "run",
            "--tensorboard-dir",
            tb,
            "--data-cache-dir",
            data_cache,
        ],
        tmp_path / "train.json",
        nproc=2,
        timeout=600,
    )
    readout = next(r for r in result["wsm_readouts"] if r["iteration"] == 8)
    window = tmp_path / "run" / "wsm_window"
    inputs = [Path(p).name for p in readout["merge"]["inputs"]]
    assert inputs == ["iter_0000004", "iter_0000006", "iter_0000008"]

    # MoE metrics: the MoE layers only, named by their global layer index from 0.
    tags = _scalar_tags(tb)
    per_layer = {t for t in tags if t.startswith("moe/global_max_violation/layer_")}
    assert per_layer == {f"moe/global_max_violation/layer_{i}" for i in moe_layers}, tags
    assert result["moe"]["moe_layers"] == [i + 1 for i in moe_layers]

    # The window merged to disk, evaluated: the readout's numbers.
    merged = tmp_path / "merged"
    run_script(
        "tools/merge_wsm.py",
        ["--load-dir", window, "--method", "mean", "--save", merged, "--no-progress-bar"],
        nproc=2,
    )
    out = tmp_path / "eval.json"
    run_script(
        "tools/evaluate.py",
        ["--load", merged, *SAME_EVAL, "--data-cache-dir", data_cache, "--output-json", out],
    )
    evaluated = json.loads(out.read_text())
    assert evaluated["loss"] == pytest.approx(readout["loss"], abs=1e-5)
    assert sorted(evaluated["moe"]["global_max_violation"]) == [str(i + 1) for i in moe_layers]

    # Every floating-point tensor of the merge is the window's weighted sum with the merge's
    # coefficients (the expert bias buffer, shared experts, dense layers and MLA weights too).
    from megatron_wsm.testing.synthetic import load_reference

    coefficients = readout["merge"]["coefficients"]
    assert len(coefficients) == len(inputs)
    states = [load_reference(window / n) for n in inputs]
    got = load_reference(merged)
    floats = [k for k, v in got.items() if v.is_floating_point()]
    for key in floats:
        want = sum(c * s[key].double() for c, s in zip(coefficients, states))
        torch.testing.assert_close(got[key].double(), want, rtol=1e-6, atol=1e-7, msg=key)
    _check_family_keys(name, floats, states)


def _check_family_keys(name: str, keys: list[str], states: list[dict]) -> None:
    joined = "\n".join(keys)
    if name == "qwen3_moe":
        assert "self_attention.q_layernorm.weight" in joined
    if name == "deepseek":
        # non-homogeneous layers: megatron-core keys them per layer
        assert "decoder.layers.0.mlp.linear_fc1.weight" in keys  # the dense first layer
        assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in keys
        assert "decoder.layers.1.self_attention.linear_kv_down_proj.weight" in keys
        assert "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight" in keys
        bias = "decoder.layers.2.mlp.router.expert_bias"
        assert bias in keys
        # the bias moved during training (the merge above averaged real values)
        assert any(s[bias].abs().sum() > 0 for s in states)
        assert not torch.equal(states[0][bias], states[-1][bias])


def test_deepseek_family_trains_merges_and_evaluates(data_cache, tmp_path):
    """The family with the most that is new (MLA, dense layer, shared experts, expert bias)
    stays in the default suite (≈ 60 s); the other two are marked slow."""
    _check_family("deepseek", data_cache, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_family_trains_merges_and_evaluates(family, data_cache, tmp_path):
    _check_family(family, data_cache, tmp_path)


_LOCAL_KEYS = """
import json, sys
from megatron_wsm.arguments import parse_run_config
from megatron_wsm.distributed import init_distributed
from megatron_wsm.model import build_gpt_model, build_transformer_config
from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.testing.families import REFERENCE_FAMILIES
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

out = {}
for i, name in enumerate(sorted(REFERENCE_FAMILIES)):
    cfg, _ = parse_run_config([*TINY_MODEL, *REFERENCE_FAMILIES[name]])
    if i == 0:
        init_distributed(cfg.parallel, 1)
    gpt = build_gpt_model(build_transformer_config(cfg.model, cfg.parallel), cfg.model, 512)
    tensors = (ShardedTensor, ShardedTensorFactory)
    keys = {v.key for v in nested_values(gpt.sharded_state_dict()) if isinstance(v, tensors)}
    out[name] = sorted(keys)
print("KEYS" + json.dumps(out))
"""


def test_family_checkpoint_keys_equal_the_te_specs():
    """The local spec's checkpoint keys for each family are those megatron-core's TE spec
    gives (the key list derived from its structure, TE itself not being installed here), so a
    family's checkpoint moves between CPU and GPU runs."""
    import subprocess
    import sys

    from megatron_wsm.arguments import parse_run_config
    from megatron_wsm.checkpoint import keys as spec_keys
    from megatron_wsm.config.layer_freq import moe_layer_pattern
    from tests.helpers import ROOT, _env

    proc = subprocess.run(
        [sys.executable, "-c", _LOCAL_KEYS],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.split("KEYS", 1)[1])
    for name, local in got.items():
        m = parse_run_config([*TINY_MODEL, *REFERENCE_FAMILIES[name]])[0].model
        te = spec_keys.te_family_param_keys(
            moe_layer_pattern(m.moe_layer_freq, m.num_layers),
            m.num_experts,
            m.normalization,
            qk_layernorm=m.qk_layernorm,
            multi_latent_attention=m.multi_latent_attention,
            q_lora_rank=m.q_lora_rank,
            shared_experts=bool(m.moe_shared_expert_intermediate_size),
            expert_bias=m.moe_router_enable_expert_bias,
            qkv_bias=m.add_qkv_bias,
            shared_expert_gate=m.moe_shared_expert_gate,
        )
        decoder = [k for k in local if k.startswith("decoder.layers.")]
        assert decoder == te, (name, sorted(set(decoder) ^ set(te)))
        assert "decoder.final_layernorm.weight" in local and "output_layer.weight" in local


@pytest.mark.slow
def test_deepseek_family_resumes_bitwise(data_cache, tmp_path):
    """A full checkpoint of the DeepSeek-style model (per-layer keys, MLA, shared experts, the
    expert-bias buffer, the optimizer) resumes to the losses of the uninterrupted run."""
    flags, layout, _ = FAMILIES["deepseek"]
    common = [*TINY_MODEL, *flags, *layout, "--data-cache-dir", data_cache]
    first = [*common, "--save", tmp_path / "a", "--save-interval", "2"]
    run_pretrain([*first, "--train-iters", "4"], tmp_path / "1.json", nproc=2)
    resumed = run_pretrain(
        [*first, "--train-iters", "6", "--load", tmp_path / "a"], tmp_path / "2.json", nproc=2
    )
    straight = run_pretrain(
        [*common, "--train-iters", "6", "--save", tmp_path / "b"], tmp_path / "3.json", nproc=2
    )
    assert losses(resumed) == losses(straight)[-2:]
