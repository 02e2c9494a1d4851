"""One callback type for the training loop, with named lifecycle points.

:func:`megatron_wsm.training.train` calls these points and nothing else; what happens at them
(saving, the merged readout, logging, the MoE counters) lives in callbacks that
``pretrain.run`` lists, so the loop knows none of them by name:

==============================  ===============================================================
point                           called
==============================  ===============================================================
``after_step(comp, result)``    after every iteration (``comp.state`` already advanced)
``at_evaluation(comp, ev)``     after each periodic evaluation; returns more evaluations to
                                log beside it (the merged window's)
``after_evaluation(comp, ev,    then, with every callback's extra evaluations (in list order)
extra)``
``after_save(saved)``           when a checkpoint is complete on disk (rank 0; async saves
                                iterations later)
``at_exit(comp, error)``        once when the loop ends, normally (``error`` None) or by an
                                exception; runs even then, for every callback
==============================  ===============================================================

Callbacks run in list order at every point; the order is part of the run's behaviour (the
collectives inside them must be called in the same order on every rank, and a save must come
after the step it saves). The implementations: ``moe_metrics.ExpertLoadCallback`` (the expert
counts of each global batch), ``log_callback.LogCallback`` (console, TensorBoard, progress
bar), ``checkpoint_callback.CheckpointCallback`` (full and window saves, async completion,
the save-directory locks at exit) and ``readout_callback.ReadoutCallback``
(``--wsm-eval-methods``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the loop imports this module: no import of it at run time
    from megatron_wsm.checkpoint.manager import SaveResult
    from megatron_wsm.run_state import Components, StepResult

#: An evaluation as :func:`megatron_wsm.training.evaluate` returns it (loss, perplexity, moe…).
Evaluation = dict[str, Any]


class Callback:
    """Base of every training callback: each point does nothing unless overridden."""

    def after_step(self, comp: Components, result: StepResult) -> None:
        """After an iteration: ``comp.state`` counts it, ``result`` reports it."""

    def at_evaluation(self, comp: Components, evaluation: Evaluation) -> list[Evaluation]:
        """After a periodic evaluation of the live weights; returns further evaluations of the
        same iteration to log beside it (rows with ``method``; a row without ``loss`` was
        skipped and is not logged)."""
        return []

    def after_evaluation(
        self, comp: Components, evaluation: Evaluation, extra: list[Evaluation]
    ) -> None:
        """Once every callback's :meth:`at_evaluation` ran: the live evaluation and all extra
        ones, to record."""

    def after_save(self, saved: SaveResult) -> None:
        """A checkpoint is complete on disk (called on global rank 0, where saves are finalised;
        for an async save that is iterations after the step it holds)."""

    def at_exit(self, comp: Components, error: BaseException | None) -> None:
        """When the loop ends; ``error`` is the exception that ends it, if any. Must finish what
        the callback left open (pending saves, files, locks) in either case."""

    def attach(self, callbacks: CallbackList) -> None:
        """Called once by the :class:`CallbackList` that holds this callback: a callback that
        causes a point of its own (the checkpoint callback: :meth:`after_save`) keeps it."""


class CallbackList:
    """Calls one point on every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            callback.attach(self)

    def after_save(self, saved: SaveResult) -> None:
        """:meth:`Callback.after_save` of each callback."""
        for callback in self.callbacks:
            callback.after_save(saved)

    def after_step(self, comp: Components, result: StepResult) -> None:
        """:meth:`Callback.after_step` of each callback."""
        for callback in self.callbacks:
            callback.after_step(comp, result)

    def at_evaluation(self, comp: Components, evaluation: Evaluation) -> list[Evaluation]:
        """:meth:`Callback.at_evaluation` of each callback, then
        :meth:`Callback.after_evaluation` of each with all the extra evaluations; returns them."""
        extra: list[Evaluation] = []
        for callback in self.callbacks:
            extra.extend(callback.at_evaluation(comp, evaluation))
        for callback in self.callbacks:
            callback.after_evaluation(comp, evaluation, extra)
        return extra

    def at_exit(self, comp: Components, error: BaseException | None) -> None:
        """:meth:`Callback.at_exit` of every callback, even when an earlier one raises (a lock
        must be released although a pending save failed); then the first such exception is
        raised."""
        first: BaseException | None = None
        for callback in self.callbacks:
            try:
                callback.at_exit(comp, error)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others ran
                if first is None:
                    first = e
        if first is not None:
            raise first
