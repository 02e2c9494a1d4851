"""Data blends with two processes: node-local index caches (rank 0's BlendedDataset and member
indices shipped to the other rank) and the trainer on a weighted blend and on mock data with
EP=2 / DP=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_wsm.ports import free_port
from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.testing.launch import ROOT, losses, run_pretrain
from tests.unit.test_data_blends import VOCAB, _write_indexed

pytestmark = pytest.mark.distributed

_WORKER = r"""
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from megatron_wsm.arguments import parse_run_config
from megatron_wsm.config.blends import megatron_num_samples
from megatron_wsm.data.datasets import datasets_from_flags
from megatron_wsm.data.tokenizers import tokenizer_from_config
a, b, root = sys.argv[2], sys.argv[3], sys.argv[4]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
# Each rank in its own directory with a relative cache path: node-local disks of two nodes.
node = os.path.join(root, f"node{rank}")
os.makedirs(node, exist_ok=True)
os.chdir(node)
cfg, _ = parse_run_config(["--data-path", "0.3", a, "0.7", b, "--split", "80,10,10",
    "--data-cache-path", "cache", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511",
    "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2"])
cfg.data.validate()
sizes = megatron_num_samples(20, 4, 5, 2)
train, valid, test = datasets_from_flags(
    cfg.data, tokenizer_from_config(cfg.data), 32, 1234, sizes)
digest = hashlib.sha256(b"".join(train[i]["tokens"].numpy().tobytes() for i in range(sizes[0])))
out = [None] * dist.get_world_size()
dist.all_gather_object(out, (digest.hexdigest(), train.dataset_index.tolist(), len(valid)))
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("blends")
    _write_indexed(root / "a", 60, 1, 0)
    _write_indexed(root / "b", 40, 2, 300)
    return str(root / "a"), str(root / "b")


def test_blend_with_node_local_caches(tmp_path: Path, corpora) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONWARNINGS="ignore",
            OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, str(script), str(ROOT), *corpora, str(tmp_path)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    line = next(ln for ln in outputs[0][0].splitlines() if ln.startswith("RESULT "))
    per_rank = json.loads(line[len("RESULT ") :])
    assert per_rank[0] == per_rank[1], "ranks must read the same blend"
    for rank in range(2):  # both "nodes" hold the blend's and its members' index files
        names = [p.name for p in (tmp_path / f"node{rank}" / "cache").iterdir()]
        assert sum("-BlendedDataset-" in n and n.endswith("dataset_index.npy") for n in names) == 3
        assert sum("-GPTDataset-" in n and n.endswith("shuffle_index.npy") for n in names) == 6


@pytest.mark.parametrize("source", ["blend", "mock"])
def test_trainer_on_a_weighted_blend_and_mock_data_with_expert_parallelism(
    tmp_path: Path, corpora, source: str
) -> None:
    """Trains (EP=2, DP=2) on ``--data-path 0.3 A 0.7 B`` and on ``--mock-data`` (the data of
    the Megatron-LM fixture checkpoints, tests/data/megatron_lm)."""
    a, b = corpora
    if source == "blend":
        data = ["--data-path", "0.3", a, "0.7", b, "--split", "80,10,10"]
        data += ["--data-cache-path", str(tmp_path / "cache")]
    else:
        data = ["--mock-data"]
    result = run_pretrain(
        [
            *TINY_MODEL, *data,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--expert-model-parallel-size", "2",
            "--train-iters", "4", "--eval-interval", "2", "--lr", "1e-2",
        ],
        tmp_path / "out.json",
        nproc=2,
    )  # fmt: skip
    trained = losses(result)
    assert len(trained) == 4 and all(np.isfinite(trained)) and trained[-1] < trained[0]
    assert np.isfinite(result["loss"]) and result["iteration"] == 4
    assert any("valid_loss" in h for h in result["train_history"])
