"""Checkpoints are portable between the local and TE specs, and older local names still load.

The local model is built for real (one process); the TE key list is derived from
megatron-core's TE spec (``spec_keys.te_spec_param_keys``), as TE itself is not installed here.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint import keys as spec_keys
from megatron_wsm.checkpoint.manifest import read_manifest
from tests.helpers import ROOT, TINY_MODEL, _env, losses, run_pretrain

pytestmark = pytest.mark.distributed

_LOCAL_KEYS = """
import json, sys
from megatron_wsm.config import ModelConfig, ParallelConfig
from megatron_wsm.distributed import init_distributed
from megatron_wsm.accelerators import layer_spec_name
from megatron_wsm.model import build_gpt_model, build_transformer_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def tensor_keys(sharded):
    # Sorted distinct tensor keys of a sharded state dict (what a checkpoint stores).
    tensors = (ShardedTensor, ShardedTensorFactory)
    return sorted({v.key for v in nested_values(sharded) if isinstance(v, tensors)})


par = ParallelConfig()
init_distributed(par, 1)
out = []
for experts, norm, untie in json.loads(sys.argv[1]):
    m = ModelConfig(num_layers=2, hidden_size=32, num_experts=experts, normalization=norm,
                    untie_embeddings_and_output_weights=untie)
    g = build_gpt_model(build_transformer_config(m, par), m, 512)
    out.append(tensor_keys(g.sharded_state_dict()))
print("KEYS" + json.dumps({"spec": layer_spec_name(), "keys": out}))
"""

CASES = [(4, "RMSNorm", True), (4, "LayerNorm", True), (None, "RMSNorm", False)]


def test_local_spec_keys_equal_te_spec_keys():
    proc = subprocess.run(
        [sys.executable, "-c", _LOCAL_KEYS, json.dumps(CASES)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.split("KEYS", 1)[1])
    assert got["spec"] == "local"
    for (experts, norm, untie), local in zip(CASES, got["keys"]):
        te = spec_keys.te_spec_param_keys(experts, norm, untie)
        assert local == te, (experts, norm, sorted(set(local) ^ set(te)))


def _rename_to_legacy(ckpt: Path) -> list[str]:
    """Rewrite a torch_dist checkpoint's ``.metadata`` with the local spec's older norm names,
    as the code before the shared key scheme wrote them (the shard bytes do not name keys)."""
    path = ckpt / ckpt_integrity.METADATA_FILE
    md = pickle.loads(path.read_bytes())
    renamed = []

    def new_name(fqn: str) -> str:
        old = spec_keys.legacy_key(fqn)
        if old is not None:
            renamed.append(fqn)
        return old or fqn

    md.state_dict_metadata = {new_name(k): v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {
        dataclasses.replace(idx, fqn=spec_keys.legacy_key(idx.fqn) or idx.fqn): info
        for idx, info in md.storage_data.items()
    }
    if isinstance(getattr(md, "planner_data", None), dict):
        md.planner_data = {spec_keys.legacy_key(k) or k: v for k, v in md.planner_data.items()}
    if isinstance(getattr(md, "mcore_data", None), dict):
        md.mcore_data = {spec_keys.legacy_key(k) or k: v for k, v in md.mcore_data.items()}
    path.write_bytes(pickle.dumps(md))
    return renamed


def test_checkpoint_with_old_local_names_resumes_bit_exactly(data_cache, tmp_path):
    common = [*TINY_MODEL, "--data-cache-dir", data_cache, "--train-iters", "4"]
    save = tmp_path / "a"
    straight = run_pretrain([*common, "--save", save, "--save-interval", "2"], tmp_path / "a.json")
    manifest = read_manifest(save / "iter_0000002")
    assert manifest is not None
    assert manifest.model_spec["layer_spec"] == "local"
    assert manifest.model_spec["key_scheme"] == spec_keys.KEY_SCHEME
    stored = spec_keys.checkpoint_keys(save / "iter_0000002")
    assert "decoder.final_layernorm.weight" in stored

    legacy = tmp_path / "legacy" / "iter_0000002"
    shutil.copytree(save / "iter_0000002", legacy)
    renamed = _rename_to_legacy(legacy)
    # model and Adam moments of every norm: the load must find all of them under old names
    assert any(k.startswith("optimizer.") for k in renamed), renamed
    old_keys = spec_keys.checkpoint_keys(legacy)
    assert "decoder.final_layernorm.norm.weight" in old_keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_norm.weight" in old_keys
    assert not [k for k in old_keys if k.endswith("pre_mlp_layernorm.weight")]
    assert ckpt_integrity.verify(legacy) == []

    resumed = run_pretrain(
        [*common, "--load", legacy, "--save", tmp_path / "b"], tmp_path / "b.json"
    )
    assert [h["iteration"] for h in resumed["train_history"]] == [3, 4]
    assert losses(resumed) == losses(straight)[2:]  # bitwise on CPU
