"""What the trainer logs: a console line and TensorBoard scalars every iteration / at
``--log-interval``, every evaluation (with the merged-window readouts beside it), and the
progress bar. A :class:`~megatron_wsm.callbacks.Callback`; tags in
:mod:`megatron_wsm.metric_names`."""

from __future__ import annotations

import sys
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from megatron_wsm import distributed as wdist
from megatron_wsm import metric_names as names
from megatron_wsm.callbacks import Callback, Evaluation
from megatron_wsm.checkpoint.manager import SaveResult
from megatron_wsm.checkpoint.manifest import KIND_WINDOW
from megatron_wsm.moe_metrics import (
    MEAN_GLOBAL_MAX_VIOLATION,
    MEAN_GLOBAL_MIN_VIOLATION,
    format_console,
)
from megatron_wsm.run_state import Components, StepResult
from megatron_wsm.training import print_rank0


def moe_console(moe: dict[str, Any] | None) -> str:
    """Console fragment of an evaluation's MoE violations (empty for dense models)."""
    if not moe:
        return ""
    return (
        f" | moe max vio {moe['mean_global_max_violation']:.4f}"
        f" | moe min vio {moe['mean_global_min_violation']:.4f}"
    )


class LogCallback(Callback):
    """Console line + TensorBoard scalars on global rank 0 (all values are world-reduced), the
    same scalars to W&B with ``--wandb-project`` (:mod:`megatron_wsm.wandb_writer`), the
    progress bar (``--no-progress-bar``, only on a terminal) and a line per completed save."""

    def after_save(self, saved: SaveResult) -> None:
        """One console line per complete checkpoint (a window one relative to the last full)."""
        if saved.kind != KIND_WINDOW:
            self._last_full_bytes = saved.bytes
            print(
                f"saved {saved.kind} checkpoint at iteration {saved.iteration}: {saved.path} "
                f"({saved.bytes / 2**20:.1f} MiB, {saved.seconds:.2f} s)",
                flush=True,
            )
            return
        note = ""
        if self._last_full_bytes:
            note = f", {100.0 * saved.bytes / self._last_full_bytes:.1f}% of a full checkpoint"
        print(
            f"saved window checkpoint at iteration {saved.iteration}: {saved.path} "
            f"({saved.bytes / 2**20:.2f} MiB{note}, {saved.seconds:.2f} s)",
            flush=True,
        )

    def __init__(self, comp: Components) -> None:
        self.writer = None
        tb_dir = comp.cfg.training.tensorboard_dir
        if tb_dir and wdist.rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tb_dir, max_queue=50)
        self.wandb = None
        t = comp.cfg.training
        if t.wandb_project and wdist.rank() == 0:  # the rank that writes TensorBoard
            from megatron_wsm.wandb_writer import WandbScalars, wandb_dir

            self.wandb = WandbScalars(
                t.wandb_project,
                t.wandb_exp_name,
                wandb_dir(t.wandb_save_dir, t.save),
                t.wandb_entity,
                comp.cfg.to_json(),
            )
        self._losses: list[float] = []
        self._times: list[float] = []
        self._moe_aux: dict[str, torch.Tensor] = {}
        self._skipped = 0
        self._last_full_bytes: int | None = None
        self.progress = None
        if t.progress_bar and wdist.rank() == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=t.train_iters, initial=comp.state.iteration, unit="it")

    def _scalar(self, tag: str, value: float, step: int, iteration: int | None = None) -> None:
        """One scalar to TensorBoard at ``step`` and to W&B at ``iteration`` (default: the
        step; tags against consumed tokens pass both)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.add(tag, value, step if iteration is None else iteration)

    def after_step(self, comp: Components, result: StepResult) -> None:
        """Record one iteration; emit at ``--log-interval`` (and at the last iteration)."""
        it = comp.state.iteration
        self._losses.append(result.loss)
        self._times.append(result.seconds)
        self._skipped += int(result.skipped)
        if comp.cfg.model.num_experts:
            # megatron-core keeps the aux loss per layer; reduce it across PP/DP every step
            # (a collective, so every rank calls it) and accumulate like Megatron-LM.
            track_moe_metrics(
                loss_scale=1.0 / comp.num_microbatches,
                iteration=it,
                writer=None,
                total_loss_dict=self._moe_aux,
                num_layers=comp.cfg.model.num_layers,
            )
        tokens = comp.state.consumed_tokens
        if self.writer is not None or self.wandb is not None:
            self._scalar(names.LM_LOSS, result.loss, it)
            self._scalar(names.LM_LOSS_VS_TOKENS, result.loss, tokens, it)
            self._scalar(names.LEARNING_RATE, result.learning_rate, it)
            self._scalar(names.LEARNING_RATE_VS_TOKENS, result.learning_rate, tokens, it)
            if result.grad_norm is not None:
                self._scalar(names.GRAD_NORM, result.grad_norm, it)
            self._scalar(names.CONSUMED_TOKENS, tokens, it)
            self._scalar(names.CONSUMED_SAMPLES, comp.state.consumed_samples, it)
        if it % comp.cfg.training.log_interval == 0 or it == comp.cfg.training.train_iters:
            self._emit(comp, result)
        if self.progress is not None:
            self.progress.update(1)

    def _emit(self, comp: Components, result: StepResult) -> None:
        it = comp.state.iteration
        n = len(self._losses)
        mean_time = sum(self._times) / max(n, 1)
        tok_s = comp.tokens_per_iteration / mean_time if mean_time > 0 else 0.0
        aux = {k: float(v) / max(n, 1) for k, v in self._moe_aux.items()}
        moe_summary: dict[str, float] = {}
        if comp.load_tracker is not None:
            moe_summary = comp.load_tracker.interval_metrics()
        self._scalar(names.TOKENS_PER_SECOND, tok_s, it)
        self._scalar(names.ITERATION_TIME, mean_time, it)
        for key, value in aux.items():
            self._scalar(key, value, it)
        for key, value in moe_summary.items():
            self._scalar(key, value, it)
        w = self.writer
        if w is not None:
            if comp.load_tracker is not None:
                comp.load_tracker.write_histograms(w, it)
            w.flush()
        if comp.load_tracker is not None:
            comp.load_tracker.reset_interval()  # every rank, after the histograms
        parts = [
            f"iter {it:6d}/{comp.cfg.training.train_iters}",
            f"tokens {comp.state.consumed_tokens:,}",
            f"lm loss {sum(self._losses) / max(n, 1):.4f}",
            f"lr {result.learning_rate:.3e}",
        ]
        if result.grad_norm is not None:
            parts.append(f"grad norm {result.grad_norm:.3f}")
        for key, value in aux.items():
            parts.append(f"{key} {value:.4f}")
        if moe_summary:
            parts.append(format_console(moe_summary).strip(" |"))
        parts.append(f"{mean_time * 1000:.0f} ms/it")
        parts.append(f"{tok_s:,.0f} tok/s")
        if self._skipped:
            parts.append(f"skipped {self._skipped}")
        print_rank0(" | ".join(parts))
        self._losses.clear()
        self._times.clear()
        self._moe_aux.clear()
        self._skipped = 0

    def _eval_scalars(self, it: int, result: Evaluation, method: str | None) -> None:
        def tag(name: str) -> str:
            return name if method is None else names.wsm_readout(name, method)

        self._scalar(tag(names.VALID_LOSS), result["loss"], it)
        self._scalar(tag(names.VALID_PPL), result["perplexity"], it)
        moe = result.get("moe")
        if moe:
            self._scalar(
                tag("validation/" + MEAN_GLOBAL_MAX_VIOLATION),
                moe["mean_global_max_violation"],
                it,
            )
            self._scalar(
                tag("validation/" + MEAN_GLOBAL_MIN_VIOLATION),
                moe["mean_global_min_violation"],
                it,
            )

    def after_evaluation(
        self, comp: Components, evaluation: Evaluation, extra: list[Evaluation]
    ) -> None:
        """Record an evaluation and the merged-window readouts of the same iteration (the
        skipped ones, without ``loss``, are left out)."""
        it = comp.state.iteration
        done = [r for r in extra if "loss" in r]
        self._eval_scalars(it, evaluation, None)
        for r in done:
            self._eval_scalars(it, r, r["method"])
        if self.writer is not None:
            self.writer.flush()
        line = (
            f"validation at iter {it} | lm loss {evaluation['loss']:.4f} | "
            f"ppl {evaluation['perplexity']:.2f}" + moe_console(evaluation.get("moe"))
        )
        for r in done:
            line += (
                f" | wsm-{r['method']} lm loss {r['loss']:.4f} ppl {r['perplexity']:.2f}"
                + moe_console(r.get("moe")).replace(" | moe", " moe")
            )
        print_rank0(line)

    def at_exit(self, comp: Components, error: BaseException | None) -> None:
        """Close the progress bar, flush and close TensorBoard and W&B."""
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
