"""Which samples an evaluation reads (``megatron_wsm/eval_set.py``), how ``tools/evaluate.py``
sizes the valid split like the training run, and the token-weighted evaluation loss."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from megatron_wsm.config import ConfigError, RunConfig, TrainingConfig
from megatron_wsm.eval_set import eval_set, mismatch_note, run_counts, same_samples


def test_first_batches_of_the_split() -> None:
    s = eval_set("valid", 8, 8, 140)
    assert (s.samples, s.batches, s.whole_split) == (64, 8, False)
    assert s.describe() == "the first 64 of the valid split's 140 samples (8 global batches of 8)"
    assert s.to_json() == {
        "split": "valid",
        "samples": 64,
        "batches": 8,
        "global_batch_size": 8,
        "split_samples": 140,
        "whole_split": False,
    }


def test_whole_split_in_full_batches() -> None:
    s = eval_set("valid", 0, 8, 140)
    assert (s.samples, s.batches, s.whole_split) == (136, 17, True)
    assert s.describe() == (
        "the whole valid split, 136 of its 140 samples "
        "(17 global batches of 8, a last partial batch left out)"
    )
    exact = eval_set("valid", 0, 4, 8)
    assert exact.describe() == "the whole valid split, 8 of its 8 samples (2 global batches of 4)"
    assert eval_set("test", 1, 4, 8).describe().endswith("(1 global batch of 4)")


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="6 samples, fewer than one global batch"):
        eval_set("valid", 0, 8, 6)
    with pytest.raises(ConfigError, match="--eval-iters must be >= 0"):
        eval_set("valid", -1, 8, 100)


def _training(eval_iters: int, gbs: int) -> TrainingConfig:
    return TrainingConfig(eval_iters=eval_iters, global_batch_size=gbs, micro_batch_size=1)


def test_same_samples_is_the_count_from_the_start() -> None:
    """The token-weighted loss does not depend on how the set is cut into batches: 8 x 8 and
    16 x 4 read the same 64 samples; the whole split only compares with itself, same batch."""
    assert same_samples(_training(8, 8), _training(16, 4))
    assert not same_samples(_training(8, 8), _training(8, 4))
    assert same_samples(_training(0, 8), _training(0, 8))
    assert not same_samples(_training(0, 8), _training(0, 4))  # another partial batch dropped
    assert not same_samples(_training(8, 8), _training(0, 8))
    assert not same_samples(_training(0, 8), _training(8, 8))


def test_mismatch_note_names_the_flags_of_the_runs_set() -> None:
    assert mismatch_note(_training(8, 8), _training(16, 4)) is None
    note = mismatch_note(_training(8, 8), _training(0, 8))
    assert note is not None
    assert "first 64 samples of the valid split" in note
    assert "--eval-iters 8 --global-batch-size 8" in note
    whole = mismatch_note(_training(0, 4), _training(2, 4))
    assert whole is not None and "the whole valid split" in whole
    assert "--eval-iters 0 --global-batch-size 4" in whole


def test_evaluate_config_keeps_the_runs_split_sizing_only() -> None:
    """tools/evaluate.py: the run's --train-iters and --eval-interval size the valid split as
    the run did (the root cause of evaluate.py != the run's validation loss on --data-path
    runs); its batch sizes and evaluation set do not carry over."""
    from megatron_wsm.cli.evaluate import config_from_run_info

    run = RunConfig()
    run.training = TrainingConfig(
        train_iters=7, eval_interval=3, eval_iters=5, global_batch_size=16, micro_batch_size=2,
        seed=42, save="/somewhere",
    )  # fmt: skip
    cfg = config_from_run_info(run.to_json())
    t = cfg.training
    assert (t.train_iters, t.eval_interval, t.seed) == (7, 3, 42)
    default = TrainingConfig()
    assert (t.eval_iters, t.global_batch_size, t.micro_batch_size, t.save) == (
        default.eval_iters, default.global_batch_size, default.micro_batch_size, None
    )  # fmt: skip
    assert run_counts(run.training) == {"train_iters": 7, "eval_interval": 3}


def test_sample_set_note_parses_silently(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_wsm.cli.evaluate import sample_set_note

    run = _training(8, 8)
    base = RunConfig()
    base.training.eval_only = True
    argv = ["--eval-iters", "0", "--eval-only", "--load", "x"]
    assert "first 64 samples" in (sample_set_note(argv, base, run) or "")
    assert sample_set_note([*argv, "--eval-iters", "8"], base, run) is None
    assert (
        sample_set_note([*argv, "--eval-iters", "16", "--global-batch-size", "4"], base, run)
        is None
    )
    assert sample_set_note([*argv, "--no-such-flag"], base, run) is None  # the trainer says why
    assert capsys.readouterr() == ("", "")


def test_evaluation_loss_is_token_weighted_over_the_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron-LM's evaluate: total loss sum / total tokens over all batches, not the mean of
    the batches' means (they differ when batches hold different numbers of loss tokens, e.g.
    with --eod-mask-loss)."""
    from megatron_wsm import training

    per_batch = {0: (30.0, 10.0), 4: (2.0, 1.0)}  # means 3.0 and 2.0; token-weighted 32 / 11
    monkeypatch.setattr(
        training,
        "_eval_batch_totals",
        lambda comp, dataset, start: torch.tensor(per_batch[start], dtype=torch.float64),
    )
    cfg = RunConfig()
    cfg.training.global_batch_size = 4
    cfg.model.seq_length = 16
    comp = types.SimpleNamespace(cfg=cfg, datasets={"valid": list(range(10))}, model=[],
                                 load_tracker=None)  # fmt: skip
    result = training.evaluate(comp, "valid", iters=2)  # type: ignore[arg-type]
    assert result["loss"] == pytest.approx(32.0 / 11.0, rel=1e-12)
    assert result["tokens"] == 2 * 4 * 16
    assert result["eval_set"]["samples"] == 8 and not result["eval_set"]["whole_split"]


def test_valid_split_sized_past_one_epoch_is_reshuffled(data_cache: str) -> None:
    """The root cause of evaluate.py != the run's validation loss on --data-path runs: the
    valid split of 133 samples (seq 256) asked for 96 (the run: 2 // 2 + 1 evaluations of
    12 x 4) is one epoch; asked for 144 (evaluate.py's old sizing, 100 // 50 + 1 evaluations)
    it spans two, and megatron-core shuffles the documents of both: the first 48 samples, the
    evaluated ones, differ. evaluate.py now sizes it as the run did."""
    from megatron_wsm.cli.evaluate import config_from_run_info
    from megatron_wsm.config.blends import megatron_num_samples
    from megatron_wsm.data.datasets import datasets_from_flags
    from megatron_wsm.data.prepare import prepare_embedded_data
    from megatron_wsm.data.tokenizers import tokenizer_from_config
    from megatron_wsm.testing.config import tiny_run_config

    prepared = prepare_embedded_data(data_cache, vocab_size=512, seed=1234)
    flags = (
        "--train-data-path", prepared.train_prefix, "--valid-data-path", prepared.valid_prefix,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
        prepared.tokenizer_model, "--seq-length", 256, "--train-iters", 2,
        "--eval-interval", 2, "--eval-iters", 12,
    )  # fmt: skip
    run = tiny_run_config(*flags)
    run.data.data_cache_path = str(Path(data_cache) / "eval_set_index")

    def first_valid_samples(t: TrainingConfig) -> list[list[int]]:
        counts = megatron_num_samples(t.train_iters, t.global_batch_size, t.eval_interval,
                                      t.eval_iters)  # fmt: skip
        tokenizer = tokenizer_from_config(run.data)
        _, valid, _ = datasets_from_flags(run.data, tokenizer, 256, t.seed, counts)
        assert len(valid) >= 133
        return [valid[i]["tokens"].tolist() for i in range(48)]

    ran = first_valid_samples(run.training)
    # evaluate.py's config: from the run's manifest, with the run's --eval-iters and batch.
    evaluation = config_from_run_info(run.to_json()).training
    evaluation.eval_iters, evaluation.global_batch_size = 12, 4
    assert first_valid_samples(evaluation) == ran
    evaluation.train_iters, evaluation.eval_interval = 100, 50  # the old sizing
    assert first_valid_samples(evaluation) != ran


def test_recorded_run_training_only_for_our_manifests_with_training_flags() -> None:
    """The note compares with the run's recorded flags only: not an old manifest's defaults,
    not a Megatron-LM checkpoint (its validation moves through the split)."""
    from megatron_wsm.checkpoint.megatron_lm import EXTRA_MEGATRON_LM
    from megatron_wsm.cli.evaluate import recorded_run_training

    run = RunConfig()
    run.training = TrainingConfig(eval_iters=3, global_batch_size=16, micro_batch_size=2)

    def manifest(extra: dict) -> types.SimpleNamespace:
        from megatron_wsm.checkpoint.manifest import CheckpointManifest

        m = types.SimpleNamespace(extra=extra, model_config={"num_layers": 2})
        m.run_info = lambda: CheckpointManifest.run_info(m)  # type: ignore[arg-type]
        return m

    found = recorded_run_training(manifest({"run": run.to_json()}))
    assert found is not None and (found.eval_iters, found.global_batch_size) == (3, 16)
    assert recorded_run_training(None) is None
    assert recorded_run_training(manifest({})) is None  # old manifest: model shapes only
    megatron = {"run": run.to_json(), EXTRA_MEGATRON_LM: {}}
    assert recorded_run_training(manifest(megatron)) is None
