"""A checkpoint read at another tensor-parallel size keeps the vocabulary padding it was written
with (Megatron-LM pads to a multiple of ``--make-vocab-size-divisible-by`` x TP, so the rows
depend on the writer's TP): tools/evaluate.py and the export reference take the rows from the
checkpoint (``args.padded_vocab_size``, as Megatron-LM's ``--use-checkpoint-args``); a training
resume at another TP is refused with the flag that gives the same rows.

The end-to-end case on a checkpoint of our trainer (TP=2 written, TP=1 evaluated, exported,
merged, resumed) is tests/distributed/test_tp_vocab_padding.py (slow); here: the rules, and
Megatron-LM's own TP=2 fixture evaluated on one process.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.checkpoint.manager import CheckpointManager, model_identity
from megatron_wsm.checkpoint.manifest import CheckpointManifest, ParallelLayout
from megatron_wsm.cli.evaluate import config_from_manifest
from megatron_wsm.config import ConfigError
from megatron_wsm.model import model_vocab_rows, padded_vocab_size, padding_mismatch_hint
from megatron_wsm.testing.config import tiny_run_config
from megatron_wsm.testing.launch import run_script

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "megatron_lm"


def test_the_padding_depends_on_the_tensor_parallel_size() -> None:
    """The problem: one vocabulary, two TP sizes, two embedding shapes."""
    assert (padded_vocab_size(512, 1, 192), padded_vocab_size(512, 2, 192)) == (576, 768)
    assert (padded_vocab_size(4097, 1, 128), padded_vocab_size(4097, 2, 128)) == (4224, 4352)


def test_a_recorded_size_is_kept_at_any_tp_that_splits_it() -> None:
    assert model_vocab_rows(512, 1, 192) == 576  # a new model: this TP's padding
    assert model_vocab_rows(512, 1, 192, recorded=768) == 768
    assert model_vocab_rows(512, 4, 192, recorded=768) == 768
    assert model_vocab_rows(4097, 1, 128, recorded=4352) == 4352


def test_a_recorded_size_that_cannot_be_used_is_refused() -> None:
    with pytest.raises(ConfigError, match="768 rows, fewer than the tokenizer's 1000 tokens"):
        model_vocab_rows(1000, 1, 128, recorded=768)
    with pytest.raises(ConfigError, match=r"do not split over --tensor-model-parallel-size 5"):
        model_vocab_rows(512, 5, 128, recorded=768)


@given(
    vocab=st.integers(1, 70_000),
    writer_tp=st.sampled_from([1, 2, 4, 8]),
    multiple=st.sampled_from([1, 8, 64, 128, 192]),
    reader_tp=st.sampled_from([1, 2, 3, 4, 8]),
)
def test_the_hinted_flag_gives_the_checkpoints_rows(vocab, writer_tp, multiple, reader_tp):
    """The flag the resume refusal names pads the same vocabulary to exactly the rows stored."""
    rows = padded_vocab_size(vocab, writer_tp, multiple)
    hint = padding_mismatch_hint(rows, vocab, reader_tp)
    if rows % reader_tp:
        assert hint == ""  # no flag can: the rows do not split over this TP
        return
    flag = int(hint.split("--make-vocab-size-divisible-by ")[-1].split(",")[0])
    assert padded_vocab_size(vocab, reader_tp, flag) == rows


def _manifest(padded: int, *flags: str) -> CheckpointManifest:
    """A manifest as the trainer writes it (run info + model identity with ``padded``)."""
    cfg = tiny_run_config(*flags)
    cfg.model.vocab_size = 512
    run = cfg.to_json()
    return CheckpointManifest(
        kind="full",
        iteration=4,
        model_config=model_identity(cfg.model.to_json(), padded),
        parallel=ParallelLayout(tensor_model_parallel_size=2, world_size=2),
        extra={"run": run},
    )


def test_evaluate_takes_the_rows_from_the_checkpoint_and_flags_keep_them() -> None:
    manifest = _manifest(768, "--make-vocab-size-divisible-by", "192")
    cfg = config_from_manifest(manifest)
    assert cfg.data.padded_vocab_size == 768 and cfg.data.make_vocab_size_divisible_by == 192
    # What tools/evaluate.py does next: its command line over the checkpoint's config (no
    # flag sets the rows: Megatron-LM has none either, they come with the checkpoint).
    over, _ = parse_run_config(["--tensor-model-parallel-size", "1", "--eval-iters", "0"], cfg)
    assert over.data.padded_vocab_size == 768
    # A training run's own config has none (its TP's padding, recorded in its manifest).
    assert tiny_run_config().data.padded_vocab_size is None
    assert manifest.run_info()["data"]["padded_vocab_size"] is None


def test_evaluate_takes_the_rows_of_a_megatron_lm_checkpoint() -> None:
    from megatron_wsm.checkpoint.megatron_lm import manifest_of

    manifest = manifest_of(FIXTURES / "tp2_plain" / "iter_0000003")
    assert manifest is not None and manifest.parallel.tensor_model_parallel_size == 2
    assert config_from_manifest(manifest).data.padded_vocab_size == 512


def _padding_hint(diff: dict, vocab: int, tp: int) -> str:
    # The method reads only the manager's identity and layout.
    manager = types.SimpleNamespace(
        identity={"vocab_size": vocab},
        layout=ParallelLayout(tensor_model_parallel_size=tp),
    )
    return CheckpointManager._padding_hint(manager, diff)  # type: ignore[arg-type]


def test_a_resume_at_another_tp_is_told_the_flag_that_fits() -> None:
    hint = _padding_hint({"padded_vocab_size": (768, 576)}, 512, 1)
    assert "pass --make-vocab-size-divisible-by 768, which gives the same 768 rows" in hint
    assert "--make-vocab-size-divisible-by 192" in _padding_hint(
        {"padded_vocab_size": (768, 1024)}, 512, 4
    )
    # Another model, or rows this TP cannot split: no hint.
    assert _padding_hint({"padded_vocab_size": (768, 576), "hidden_size": (32, 64)}, 512, 1) == ""
    assert _padding_hint({"padded_vocab_size": (768, 770)}, 512, 5) == ""


def test_megatron_lm_tp2_checkpoint_evaluated_on_one_process(tmp_path: Path) -> None:
    """Megatron-LM's own TP=2 checkpoint (tests/data/megatron_lm, validation loss 6.219274
    logged by Megatron-LM after iteration 3) on one process at TP=1, with a padding flag that
    gives this run other rows (768 for its 512 tokens, as another TP size would): the model
    keeps the checkpoint's 512 rows and evaluates to Megatron-LM's loss. Before the fix: refused
    (``differ in {'padded_vocab_size': (512, 768)}``)."""
    out = tmp_path / "eval.json"
    proc = run_script(
        "tools/evaluate.py",
        ["--load", FIXTURES / "tp2_plain", "--eval-iters", "1", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "3",  # Megatron-LM's evaluation
         "--make-vocab-size-divisible-by", "384", "--output-json", out],
        nproc=1,
    )  # fmt: skip
    assert "vocab 512 (padded 512)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["iteration"] == 3
    assert result["loss"] == pytest.approx(6.219274, abs=3e-6)
