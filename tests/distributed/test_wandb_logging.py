"""W&B under 2 processes (EP=2): one W&B run, written by the rank that writes TensorBoard, with
TensorBoard's scalars (values reduced over the world)."""

from __future__ import annotations

import pytest

from megatron_wsm.annealing.logs import tensorboard_scalars
from tests.helpers import TINY_MODEL, run_pretrain
from tests.unit.test_wandb_logging import wandb_history

pytestmark = pytest.mark.distributed


def test_one_wandb_run_with_the_tensorboard_scalars(data_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    tb, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    run_pretrain(
        [*TINY_MODEL, "--train-iters", "2", "--expert-model-parallel-size", "2",
         "--data-cache-dir", data_cache, "--tensorboard-dir", tb, "--save", ckpt,
         "--wandb-project", "wsm-test", "--wandb-exp-name", "ep2"],
        tmp_path / "r.json",
        nproc=2,
    )  # fmt: skip
    # No --wandb-save-dir: Megatron-LM's default, <save>/wandb; one run for the two ranks.
    (run_file,) = ckpt.glob("wandb/wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    tensorboard = tensorboard_scalars(tb)
    assert sorted(history) == [1, 2]
    for tag in ("lm loss", "grad-norm", "load_balancing_loss", "moe/mean_global_max_violation"):
        got = {step: row[tag] for step, row in history.items() if tag in row}
        assert got.keys() == tensorboard[tag].keys(), tag
        for step, value in tensorboard[tag].items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
