"""``tools/evaluate.py`` on the checkpoint of iteration N gives the validation loss the trainer
logged at iteration N, when it reads the same samples (``megatron_wsm/eval_set.py``).

Root cause of the gap seen before (shown on the datasets themselves in
tests/unit/test_eval_set.py): on ``--data-path``-style data the valid split's sample count
follows Megatron-LM's ``(train_iters // eval_interval + 1) × eval_iters × global batch``, and
``tools/evaluate.py`` used its own defaults (100 // 50) instead of the run's: past one epoch
megatron-core's GPTDataset reshuffles the split, so even the first samples changed. Besides,
``tools/evaluate.py`` reads the whole split by default, another set than the run's
``--eval-iters`` batches: it now says so, and which flags read the run's set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, run_pretrain, run_script

pytestmark = pytest.mark.distributed

TOL = 1e-6


def _evaluate(ckpt: Path, args: list, out: Path, nproc: int = 1) -> tuple[dict, str]:
    proc = run_script("tools/evaluate.py", ["--load", ckpt, *args, "--output-json", out], nproc)
    return json.loads(out.read_text()), proc.stdout


def _valid_losses(result: dict) -> list[float]:
    return [h["valid_loss"] for h in result["train_history"] if "valid_loss" in h]


def test_data_path_run_evaluates_to_its_logged_validation_loss(data_cache, tmp_path):
    """Per-split data paths, seq 256: the valid split holds 133 samples. The run asks for
    (2 // 2 + 1) x 12 x 4 = 96 of them (one epoch); the old evaluate.py count, (100 // 50 + 1)
    x 48 = 144, crosses into a second epoch and reorders the split."""
    from megatron_wsm.data.prepare import prepare_embedded_data

    prepared = prepare_embedded_data(data_cache, vocab_size=512, seed=1234)
    data = [
        "--train-data-path", prepared.train_prefix,
        "--valid-data-path", prepared.valid_prefix,
        "--test-data-path", prepared.test_prefix,
        "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", prepared.tokenizer_model,
    ]  # fmt: skip
    ckpt = tmp_path / "ckpt"
    run = run_pretrain(
        [*TINY_MODEL, *data, "--seq-length", "256", "--train-iters", "2", "--eval-interval",
         "2", "--eval-iters", "12", "--save", ckpt],
        tmp_path / "run.json",
    )  # fmt: skip
    assert run["eval_set"]["samples"] == 48 and run["eval_set"]["split_samples"] == 133
    logged = _valid_losses(run)[-1]  # the periodic validation at iteration 2
    assert run["loss"] == logged  # the final validation: same weights, same set

    same = ["--eval-iters", "12", "--global-batch-size", "4"]
    result, out = _evaluate(ckpt, same, tmp_path / "same.json")
    assert result["loss"] == pytest.approx(logged, abs=TOL)
    assert result["eval_set"] == run["eval_set"]
    assert "evaluation set: the first 48 of the valid split's 133 samples" in out
    assert "note:" not in out

    # The default: the whole split (in evaluate.py's global batches of 8), another set; said
    # so, with the flags of the run's set.
    whole, out = _evaluate(ckpt, [], tmp_path / "whole.json")
    assert whole["eval_set"]["whole_split"] and whole["eval_set"]["samples"] == 16 * 8
    assert "evaluation set: the whole valid split, 128 of its 133 samples" in out
    assert (
        "note: the training run's validation read the first 48 samples of the valid split "
        "(--eval-iters 12 --global-batch-size 4)" in out
    )


@pytest.mark.slow
def test_ep2_run_evaluates_to_its_logged_validation_loss(data_cache, tmp_path):
    """Trained on 2 processes (EP 2, DP 2); evaluated on 1 process with the run's set (the
    same number) and with the same 16 samples cut into other batches (token-weighted: the same
    number up to float rounding)."""
    ckpt = tmp_path / "ckpt"
    run = run_pretrain(
        [*TINY_MODEL, "--expert-model-parallel-size", "2", "--train-iters", "4",
         "--eval-interval", "4", "--eval-iters", "4", "--save", ckpt, "--data-cache-dir",
         data_cache],
        tmp_path / "run.json", nproc=2,
    )  # fmt: skip
    logged = _valid_losses(run)[-1]
    cache = ["--data-cache-dir", data_cache]

    same, out = _evaluate(ckpt, [*cache, "--eval-iters", "4", "--global-batch-size", "4"],
                          tmp_path / "same.json")  # fmt: skip
    assert same["loss"] == pytest.approx(logged, abs=TOL)
    assert same["moe"]["mean_global_max_violation"] == pytest.approx(
        run["moe"]["mean_global_max_violation"], abs=TOL
    )
    assert "note:" not in out

    recut, out = _evaluate(
        ckpt,
        [*cache, "--eval-iters", "2", "--global-batch-size", "8", "--micro-batch-size", "4"],
        tmp_path / "recut.json",
    )
    assert recut["eval_set"]["samples"] == 16
    assert recut["loss"] == pytest.approx(logged, abs=1e-5)
    assert "note:" not in out
