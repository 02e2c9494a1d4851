"""W&B logging (--wandb-project): the same scalars as TensorBoard at the same iterations, read
back from wandb's offline run file; a missing wandb is refused before anything starts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_wsm import metric_names as names
from megatron_wsm.annealing.logs import tensorboard_scalars
from megatron_wsm.config import ConfigError, TrainingConfig
from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.wandb_writer import TOKEN_AXIS_TAGS, wandb_dir

REPO = Path(__file__).resolve().parents[2]


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` of an offline ``run-*.wandb`` file (wandb's LevelDB-style
    record log: a 7-byte file header, 32 KiB blocks of records with a 7-byte header each:
    CRC32C, little-endian length, type FULL/FIRST/MIDDLE/LAST = 1/2/3/4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            row = {  # tags with a "/" come as nested keys
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[record.history.step.num] = {
                k: v for k, v in row.items() if not k.startswith("_")
            }
    return history


def test_wandb_logs_the_tensorboard_scalars(data_cache, tmp_path):
    pytest.importorskip("wandb")  # the optional extra; installed in the dev venv
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
    }
    env.pop("RANK", None)
    tb, wb = tmp_path / "tb", tmp_path / "wb"
    argv = [*TINY_MODEL, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
            "--eval-iters", "1", "--data-cache-dir", data_cache, "--tensorboard-dir", str(tb),
            "--wandb-project", "wsm-test", "--wandb-exp-name", "tiny",
            "--wandb-save-dir", str(wb)]  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "pretrain_moe.py"), *argv], check=True, env=env, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    (run_file,) = wb.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    tensorboard = tensorboard_scalars(tb)
    assert names.VALID_LOSS in tensorboard and names.TOKENS_PER_SECOND in tensorboard
    logged = {tag for row in history.values() for tag in row}
    assert logged == set(tensorboard)  # the same tags, nothing more
    assert sorted(history) == [1, 2, 3, 4]
    for tag, points in tensorboard.items():
        if tag in TOKEN_AXIS_TAGS:  # TensorBoard's step: the consumed tokens
            got = {row[names.CONSUMED_TOKENS]: row[tag] for row in history.values() if tag in row}
        else:
            got = {step: row[tag] for step, row in history.items() if tag in row}
        assert got.keys() == points.keys(), tag
        for step, value in points.items():  # TensorBoard stores float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)


def test_missing_wandb_is_refused_before_start(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    t = TrainingConfig(wandb_project="p", wandb_exp_name="x")
    with pytest.raises(ConfigError, match=r"--wandb-project needs the wandb package"):
        t.validate(1)
    TrainingConfig().validate(1)  # without the flag wandb is not needed


def test_empty_experiment_name_is_refused():
    with pytest.raises(ConfigError, match="--wandb-exp-name must not be empty"):
        TrainingConfig(wandb_project="p", wandb_exp_name="").validate(1)


def test_wandb_directory_as_megatron_lm():
    assert wandb_dir("w", "ckpt") == "w"
    assert wandb_dir(None, "ckpt") == os.path.join("ckpt", "wandb")
    assert wandb_dir(None, None) is None
