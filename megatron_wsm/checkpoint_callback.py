"""When the trainer saves: full checkpoints at ``--save-interval``, window checkpoints at
``--wsm-interval``, then retention (:mod:`megatron_wsm.checkpoint.layout` owns the window rule), the
completion of async saves and, at exit, the last pending saves and the save directories' locks.

A :class:`~megatron_wsm.callbacks.Callback` of the training loop;
:mod:`megatron_wsm.checkpoint.manager` does the I/O. Kept out of ``pretrain.py`` so that the
route of a save flag (flag -> config -> this callback ->
:class:`~megatron_wsm.checkpoint.manager.CheckpointManager`) crosses each file once.
"""

from __future__ import annotations

import os

from megatron_wsm.callbacks import Callback, CallbackList
from megatron_wsm.checkpoint.manager import CheckpointManager, SaveResult, should_save
from megatron_wsm.checkpoint.manifest import KIND_FULL, KIND_WINDOW
from megatron_wsm.config import RunConfig
from megatron_wsm.run_state import Components, StepResult
from megatron_wsm.training import should_exit


def window_save_dir(cfg: RunConfig) -> str | None:
    """Where window checkpoints go: ``--wsm-save``, else ``<save>/wsm_window``."""
    if cfg.wsm.wsm_save:
        return cfg.wsm.wsm_save
    return os.path.join(cfg.training.save, "wsm_window") if cfg.training.save else None


class CheckpointCallback(Callback):
    """After each iteration: full saves at ``--save-interval``, window saves at
    ``--wsm-interval``, retention, and finalising async saves; at exit, the pending saves and
    the locks of ``manager.locks``."""

    def __init__(self, cfg: RunConfig, manager: CheckpointManager) -> None:
        self.cfg = cfg
        self.manager = manager
        self.window_interval = cfg.wsm.interval_iters(cfg.tokens_per_iteration)
        self.window_root = window_save_dir(cfg)
        self._saved: CallbackList | None = None

    def attach(self, callbacks: CallbackList) -> None:
        """Completed saves are announced to every callback of the loop (``after_save``)."""
        self._saved = callbacks

    def _announce(self, result: SaveResult) -> None:
        if self._saved is not None:
            self._saved.after_save(result)

    def _window_done(self, result: SaveResult) -> None:
        self._announce(result)
        w = self.cfg.wsm
        for path in self.manager.prune_window(
            result.path.parent, w.wsm_window, w.wsm_window_tokens
        ):
            print(f"pruned window checkpoint {path} (outside the window)", flush=True)

    def _full_done(self, result: SaveResult) -> None:
        self._announce(result)
        for path in self.manager.prune_full(result.path.parent, self.cfg.training.save_keep_last):
            print(f"pruned full checkpoint {path} (--save-keep-last)", flush=True)

    def after_step(self, comp: Components, result: StepResult) -> None:
        """Finalise async saves that finished, then save what this iteration calls for."""
        self.manager.poll()
        it = comp.state.iteration
        lr = comp.last_lr
        t = self.cfg.training
        if self.window_root and should_save(it, self.window_interval):
            self.manager.save(
                self.window_root,
                KIND_WINDOW,
                comp.state,
                lr,
                async_save=self.cfg.wsm.wsm_async,
                on_complete=self._window_done,
            )
        last = it == t.train_iters or should_exit(comp)
        if t.save and (should_save(it, t.save_interval) or last):
            self.manager.save(
                t.save,
                KIND_FULL,
                comp.state,
                lr,
                async_save=t.async_save,
                on_complete=self._full_done,
            )

    def at_exit(self, comp: Components, error: BaseException | None) -> None:
        """Finalise every pending async save, then release the save directories' locks.

        Also when the loop raised (a non-finite step, a failed save): the saves already under
        way are of good steps and are completed; the locks are released even when that fails.
        """
        try:
            self.manager.wait()
        finally:
            for lock in self.manager.locks:
                lock.release()
