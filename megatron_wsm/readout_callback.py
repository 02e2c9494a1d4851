"""``--wsm-eval-methods``: at every evaluation, the merged readout of the saved window.

After the live evaluation of an iteration whose window checkpoint was just saved, each method's
merge of the window is built in memory (:mod:`megatron_wsm.wsm_readout`: the checkpoints and
coefficients ``merge_wsm.py --load-dir`` would use), swapped into the model, evaluated exactly
like the live weights, and swapped back bit-exactly, so training continues as if nothing
happened. A window that is not full yet, or cannot be merged, is reported and skipped: a readout
never stops training. A :class:`~megatron_wsm.callbacks.Callback` (its evaluation point).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from megatron_wsm.callbacks import Callback, Evaluation
from megatron_wsm.checkpoint.manager import CheckpointError, CheckpointManager
from megatron_wsm.checkpoint_callback import window_save_dir
from megatron_wsm.coefficients import MergeMethod
from megatron_wsm.config import RunConfig
from megatron_wsm.merge import method_coefficients
from megatron_wsm.training import Components, evaluate, print_rank0
from megatron_wsm.wsm_readout import (
    ReadoutError,
    WindowMerge,
    merged_tensors,
    plan_window_merge,
    swapped_in,
)


class ReadoutCallback(Callback):
    """Evaluates the window's merge for each of ``--wsm-eval-methods`` at every periodic
    evaluation; keeps every readout."""

    def __init__(self, cfg: RunConfig, manager: CheckpointManager) -> None:
        self.cfg = cfg
        self.manager = manager
        self.methods = [MergeMethod(name) for name in cfg.wsm.eval_methods]
        self.window_dir = window_save_dir(cfg)
        self.full_window = cfg.wsm.window_size(cfg.tokens_per_iteration)
        #: One row per readout: iteration, method, loss, perplexity, moe, merge (or skipped).
        self.readouts: list[dict[str, Any]] = []
        self._verified: set[str] = set()
        reader = manager.window_reader()
        self._adapt = reader["adapt"]
        self._verify_files = reader["verify"]

    def _verify(self, ckpt: Any) -> None:
        # A completed window checkpoint is never rewritten: its files (and CRCs) are checked
        # once, at its first readout, not once per method and readout.
        if str(ckpt) not in self._verified:
            self._verify_files(ckpt)
            self._verified.add(str(ckpt))

    def _plan(self, iteration: int) -> WindowMerge | str:
        """The merge of the window now, or why there is none yet."""
        w = self.cfg.wsm
        try:
            plan = plan_window_merge(
                self.window_dir,
                self.methods[0],
                window_iters=w.wsm_window,
                window_tokens=w.wsm_window_tokens,
            )
        except ReadoutError as e:
            return str(e)
        if self.full_window is not None and len(plan.paths) < self.full_window:
            return (
                f"the window holds {len(plan.paths)} of its {self.full_window} checkpoints "
                "(not full yet)"
            )
        if plan.positions[-1] != iteration and plan.position_unit == "iteration":
            newest = plan.positions[-1]
            return f"the newest window checkpoint is iteration {newest}, not {iteration}"
        return plan

    def at_evaluation(self, comp: Components, evaluation: Evaluation) -> list[Evaluation]:
        """Readouts of this iteration, logged beside the live ``evaluation`` (collective: every
        rank calls it at the same iteration)."""
        it = comp.state.iteration
        self.manager.finish_pending()  # an async window save of this iteration must be on disk
        plan = self._plan(it)
        if isinstance(plan, str):
            print_rank0(f"wsm readout at iter {it} skipped: {plan}")
            rows = [{"iteration": it, "method": m.method, "skipped": plan} for m in self.methods]
            self.readouts.extend(rows)
            return rows
        rows = []
        model = self.manager.bare_model()
        for method in self.methods:
            start = time.perf_counter()
            merge = dataclasses.replace(
                plan,
                method=method,
                coefficients=tuple(
                    method_coefficients(method, plan.positions, plan.position_unit)
                ),
            )
            try:
                tensors = merged_tensors(model, merge, verify=self._verify, adapt=self._adapt)
            except (ReadoutError, CheckpointError) as e:
                print_rank0(f"wsm readout {method.method} at iter {it} skipped: {e}")
                rows.append({"iteration": it, "method": method.method, "skipped": str(e)})
                continue
            with swapped_in(model, tensors):
                result = evaluate(comp)
            del tensors
            result.update(
                iteration=it,
                method=method.method,
                merge=merge.to_json(),
                seconds=time.perf_counter() - start,
            )
            rows.append(result)
        self.readouts.extend(rows)
        return rows
