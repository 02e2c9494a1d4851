"""Which held-out samples an evaluation reads, for the trainer's validation and
``tools/evaluate.py`` alike.

Both read the *first* ``--eval-iters`` global batches of the valid split at every evaluation
(``--eval-iters 0``: the whole split in full global batches), a fixed set so that the numbers
of different iterations and checkpoints compare. (Megatron-LM's trainer moves on through the
valid split from one evaluation to the next, its ``consumed_valid_samples``; its
``--skip-train`` evaluation starts at the split's first sample.)

Two evaluations of the same weights give the same loss when

1. they read the same samples: the same ``eval_iters × global batch`` from the split's start
   (how the set is cut into global batches, micro-batches or data-parallel ranks does not
   change the loss: it is token-weighted over the whole set, as Megatron-LM's ``evaluate``
   sums the loss and the token count of every batch and divides once);
2. the valid split was built with the same sample count. megatron-core's ``GPTDataset``
   shuffles its documents over as many epochs as the requested count needs, so a count past one
   epoch reorders even the first samples. For ``--data-path`` and the other Megatron-LM data
   flags the count is Megatron-LM's ``(train_iters // eval_interval + 1) × eval_iters ×
   global batch``: ``tools/evaluate.py`` therefore takes ``--train-iters`` and
   ``--eval-interval`` from the checkpoint's run (:func:`run_counts`).

With token dropping (``--moe-expert-capacity-factor``) the loss also depends on which tokens
share a micro-batch (the capacity is per micro-batch), so the layout must match too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_wsm.config import ConfigError, TrainingConfig


@dataclass(frozen=True)
class EvalSet:
    """The samples one evaluation reads: the first ``batches × global_batch_size`` of
    ``split`` (which holds ``split_samples``)."""

    split: str
    batches: int
    global_batch_size: int
    split_samples: int
    whole_split: bool

    @property
    def samples(self) -> int:
        """Samples read (all from the start of the split)."""
        return self.batches * self.global_batch_size

    def describe(self) -> str:
        """One line for the log: which samples, how many, in which batches."""
        what = (
            f"the whole {self.split} split, {self.samples} of its {self.split_samples} samples"
            if self.whole_split
            else f"the first {self.samples} of the {self.split} split's {self.split_samples} "
            "samples"
        )
        cut = f"{self.batches} global batch{'es' if self.batches != 1 else ''} of " + str(
            self.global_batch_size
        )
        if self.whole_split and self.samples < self.split_samples:
            cut += ", a last partial batch left out"
        return f"{what} ({cut})"

    def to_json(self) -> dict[str, Any]:
        """The ``eval_set`` entry of an evaluation's result (``--output-json``)."""
        return {
            "split": self.split,
            "samples": self.samples,
            "batches": self.batches,
            "global_batch_size": self.global_batch_size,
            "split_samples": self.split_samples,
            "whole_split": self.whole_split,
        }


def eval_set(split: str, eval_iters: int, global_batch_size: int, split_samples: int) -> EvalSet:
    """The set ``--eval-iters`` (0: the whole split) reads from a split of ``split_samples``.

    Raises :class:`ConfigError` (a bad configuration: exit 2, one line) when the whole split
    holds less than one global batch. A positive ``eval_iters`` larger than the split wraps
    around it (the batch reader takes sample indices modulo the split's length).
    """
    if eval_iters < 0:
        raise ConfigError("--eval-iters must be >= 0 (0: the whole held-out split)")
    whole = eval_iters == 0
    batches = split_samples // global_batch_size if whole else eval_iters
    if batches == 0:
        raise ConfigError(
            f"the {split} split has {split_samples} samples, fewer than one global batch "
            f"({global_batch_size}); lower --global-batch-size or use --eval-iters N"
        )
    return EvalSet(split, batches, global_batch_size, split_samples, whole)


def same_samples(run: TrainingConfig, here: TrainingConfig) -> bool:
    """Whether an evaluation with ``here``'s flags reads the samples ``run``'s validation read
    (both from the start of the same valid split; see the module docstring)."""
    if run.eval_iters == 0 or here.eval_iters == 0:
        # The whole split in full global batches: the same when both read it with one size.
        return run.eval_iters == here.eval_iters and (
            run.global_batch_size == here.global_batch_size
        )
    return run.eval_iters * run.global_batch_size == here.eval_iters * here.global_batch_size


def run_set_flags(run: TrainingConfig) -> str:
    """The ``tools/evaluate.py`` flags that read ``run``'s validation samples."""
    return f"--eval-iters {run.eval_iters} --global-batch-size {run.global_batch_size}"


def mismatch_note(run: TrainingConfig, here: TrainingConfig) -> str | None:
    """A note for ``tools/evaluate.py`` when its samples are not the ones the training run
    validated on (its loss then differs from the run's logged validation loss by design);
    None when they are the same."""
    if same_samples(run, here):
        return None
    theirs = (
        "the whole valid split"
        if run.eval_iters == 0
        else f"the first {run.eval_iters * run.global_batch_size} samples of the valid split"
    )
    return (
        f"note: the training run's validation read {theirs} ({run_set_flags(run)}), not the "
        f"set evaluated here: its logged validation loss is another set's; give "
        f"{run_set_flags(run)} to evaluate its samples"
    )


def run_counts(run: TrainingConfig) -> dict[str, int]:
    """The training-run fields that decide the valid split's sample count (with the evaluation's
    own ``--eval-iters`` and global batch): ``tools/evaluate.py`` keeps them so that the split
    is shuffled as the run's was. Neither changes anything else of an ``--eval-only`` run."""
    return {"train_iters": run.train_iters, "eval_interval": run.eval_interval}
