"""The pretraining loop on megatron-core: model, optimizer, schedule, data, step, eval.

One global batch per iteration: megatron-core's ``get_forward_backward_func`` runs the
micro-batches (pipelined when PP > 1), its ``DistributedDataParallel`` reduces gradients, its
optimizer steps and ``OptimizerParamScheduler`` sets the LR. Everything else the loop does
happens in callbacks at the named points of ``callbacks.py`` (saving, the merged readout,
logging, the MoE counters), listed by ``pretrain.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_wsm import distributed as wdist
from megatron_wsm import metric_names as names
from megatron_wsm.batches import global_batch_iterator
from megatron_wsm.callbacks import Callback, CallbackList
from megatron_wsm.config import RunConfig
from megatron_wsm.eval_set import eval_set
from megatron_wsm.lr import build_scheduler
from megatron_wsm.model import build_gpt_model, build_transformer_config, layout_independent_init
from megatron_wsm.run_state import Components, StepResult, TrainState  # noqa: F401 - re-exported


def device() -> torch.device:
    """The accelerator of this rank, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def print_rank0(*args: Any) -> None:
    """Print on global rank 0 only, flushed (torchrun interleaves buffered output)."""
    if wdist.rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- setup


def build_model_and_optimizer(cfg: RunConfig, vocab_size: int) -> tuple[Any, list[DDP], Any, Any]:
    """megatron-core GPTModel wrapped in its DDP, its optimizer and LR scheduler."""
    tconfig = build_transformer_config(
        cfg.model, cfg.parallel, overrides=cfg.training.transformer_overrides()
    )
    gpt = build_gpt_model(tconfig, cfg.model, vocab_size)
    if cfg.model.layout_independent_init:
        layout_independent_init(gpt, tconfig, cfg.training.seed)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    model = [DDP(tconfig, ddp_config, gpt)]
    # Without this hook DP gradients are never all-reduced (and SP norms / embeddings of
    # tied PP stages never synchronised).
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model[0].no_sync
    optim = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=cfg.model.params_dtype == "bf16",
        fp16=cfg.model.params_dtype == "fp16",
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = build_scheduler(
        optimizer, optim, cfg.training.train_iters, cfg.training.global_batch_size
    )
    return tconfig, model, optimizer, scheduler


# ----------------------------------------------------------------------------- steps


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
    """Sum of token losses and token count; megatron-core divides by the count (per micro-batch)."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {names.LM_LOSS: report}


def _forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: DDP
) -> tuple[Any, Callable]:
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_totals(losses_reduced: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """This rank's ``[loss sum, token count]`` over its micro-batches' reports (float64)."""
    total = torch.zeros(2, dtype=torch.float64, device=device())
    for item in losses_reduced:
        total += item[names.LM_LOSS].to(total.device, torch.float64)
    return total


def _reduce_loss(
    losses_reduced: list[dict[str, torch.Tensor]], nonfinite_here: bool = False
) -> tuple[float, bool]:
    """Token-weighted mean loss over the global batch, identical on every rank, and whether any
    rank reported ``nonfinite_here`` (one collective for both: the step's non-finite check
    rides on the loss reduction instead of costing a second one).

    Ranks that did not compute the loss contribute zeros; TP replicas of the last stage add the
    same loss *and* the same token count, so the ratio is unaffected by them.
    """
    flag = torch.tensor([1.0 if nonfinite_here else 0.0], dtype=torch.float64, device=device())
    total = torch.cat([_loss_totals(losses_reduced), flag])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1)), bool(total[2] > 0)


def _forward_backward(
    comp: Components, data_iter: Iterator[dict[str, torch.Tensor]], forward_only: bool
) -> list[dict[str, torch.Tensor]]:
    """megatron-core's forward (and backward) schedule over one global batch's micro-batches;
    this rank's per-micro-batch loss reports, not yet reduced."""
    cfg = comp.cfg
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=_forward_step,
        data_iterator=data_iter,
        model=comp.model,
        num_microbatches=comp.num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        decoder_seq_length=cfg.model.seq_length,
        forward_only=forward_only,
    )


def _rank_batches(
    comp: Components, dataset: Any, consumed_samples: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch at ``consumed_samples``, on the device.

    Read in the step, not ahead on a thread: a read-ahead thread was measured on CPU and lost
    (DeepSeek-style bench model: 0.972 of bare megatron-core with it, 0.992 without; the
    thread's Python holds the GIL while the step's Python waits for it)."""
    return global_batch_iterator(
        dataset,
        consumed_samples,
        comp.cfg.training.micro_batch_size,
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
        comp.num_microbatches,
        device(),
    )


class NonFiniteStepError(FloatingPointError):
    """A step's loss or gradients are not finite; the step was not applied."""


def nonfinite_gradients(model: list[DDP], nan_only: bool = False) -> list[str]:
    """Names of this rank's parameters whose (reduced) gradient holds NaN or inf.

    ``nan_only``: infinities are legitimate (fp16's loss scaler skips those steps itself).
    The grad buffers are checked first, in one pass each; names are looked up only when one of
    them is not finite.
    """

    def bad(t: torch.Tensor) -> bool:
        # One sum first: a NaN or inf anywhere makes it non-finite, and it costs a read of the
        # buffer (an elementwise isfinite writes a mask as large as the buffer: ~5 % of a CPU
        # step). Only a non-finite sum (which an overflow or inf - inf can also give) is checked
        # element by element, so the verdict is the elementwise one.
        total = t.sum()
        if bool(torch.isfinite(total)):
            return False
        return bool(torch.isnan(t).any()) if nan_only else not bool(torch.isfinite(t).all())

    names_found: list[str] = []
    for chunk in model:
        buffers = list(getattr(chunk, "buffers", [])) + list(
            getattr(chunk, "expert_parallel_buffers", [])
        )
        if buffers and not any(bad(b.grad_data) for b in buffers):
            continue
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and bad(grad):
                names_found.append(name)
    return names_found


def check_step_finite(comp: Components, loss: float, any_rank_nonfinite: bool) -> None:
    """Raise :class:`NonFiniteStepError` on every rank when the global batch's loss or any
    rank's gradients are not finite.

    ``loss`` and ``any_rank_nonfinite`` come out of the same all-reduce (:func:`_reduce_loss`),
    so every rank takes the same branch: the step is skipped everywhere and nothing non-finite
    reaches the weights. Only then are the parameter names gathered (a second collective, on
    the failing path alone).
    """
    if not any_rank_nonfinite and math.isfinite(loss):
        return
    nan_only = comp.cfg.model.params_dtype == "fp16"
    local = nonfinite_gradients(comp.model, nan_only=nan_only)
    found = sorted({n for per_rank in wdist.all_gather_objects(local) for n in per_rank})
    what = []
    if not math.isfinite(loss):
        what.append(f"the loss is {loss}")
    if found:
        shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
        what.append(f"gradients of {len(found)} parameter(s) are not finite: {shown}")
    raise NonFiniteStepError(
        f"iteration {comp.state.iteration + 1}: {'; '.join(what)}. The step was not applied "
        "and nothing of it was saved; the newest checkpoint is the last good one. Lower --lr "
        "or check the data (--no-check-for-nan-in-loss-and-grad turns this check off)"
    )


def train_step(comp: Components) -> StepResult:
    """One optimizer step on the next global batch; advances ``comp.state``."""
    start = time.perf_counter()
    for chunk in comp.model:
        chunk.zero_grad_buffer()
    comp.optimizer.zero_grad()
    lr = current_lr(comp)
    data_iter = _rank_batches(comp, comp.datasets["train"], comp.state.consumed_samples)
    reports = _forward_backward(comp, data_iter, forward_only=False)
    check = comp.cfg.training.check_for_nan_in_loss_and_grad
    nan_only = comp.cfg.model.params_dtype == "fp16"
    nonfinite_here = check and bool(nonfinite_gradients(comp.model, nan_only=nan_only))
    loss, any_rank_nonfinite = _reduce_loss(reports, nonfinite_here)
    if check:
        # Raises before the step: the weights stay finite.
        check_step_finite(comp, loss, any_rank_nonfinite)
    update_ok, grad_norm, _ = comp.optimizer.step()
    gbs = comp.cfg.training.global_batch_size
    if update_ok:
        comp.scheduler.step(increment=gbs)
    comp.state.iteration += 1
    comp.state.consumed_samples += gbs
    comp.state.consumed_tokens += comp.tokens_per_iteration
    comp.last_lr = lr
    return StepResult(
        loss=loss,
        grad_norm=None if grad_norm is None else float(grad_norm),
        learning_rate=lr,
        skipped=not update_ok,
        seconds=time.perf_counter() - start,
    )


def current_lr(comp: Components) -> float:
    """LR the next step will use (the scheduler writes it into every param group)."""
    for group in comp.optimizer.param_groups:
        if not group.get("is_decoupled_lr", False):
            return float(group["lr"])
    return float(comp.optimizer.param_groups[0]["lr"])


def _eval_batch_totals(comp: Components, dataset: Any, consumed_samples: int) -> torch.Tensor:
    """This rank's ``[loss sum, token count]`` of the global batch at ``consumed_samples``
    (forward only; float64, not yet reduced over ranks)."""
    data_iter = _rank_batches(comp, dataset, consumed_samples)
    return _loss_totals(_forward_backward(comp, data_iter, forward_only=True))


@torch.no_grad()
def evaluate(comp: Components, split: str = "valid", iters: int | None = None) -> dict[str, Any]:
    """Loss over the first ``iters`` global batches of ``split`` (``--eval-iters``; 0: the whole
    split), a fixed set so numbers from different checkpoints compare, plus MoE violations.

    The loss is token-weighted over the whole set (the loss sums and token counts of every
    batch, divided once), as Megatron-LM's ``evaluate``: it does not depend on how the set is
    cut into batches, micro-batches or ranks (:mod:`megatron_wsm.eval_set`).
    """
    dataset = comp.datasets[split]
    gbs = comp.cfg.training.global_batch_size
    # A ConfigError when the whole split holds less than one global batch: the trainer and
    # tools/evaluate.py report it as a bad configuration (exit 2, one line), on every rank.
    vset = eval_set(split, iters or comp.cfg.training.eval_iters, gbs, len(dataset))
    for chunk in comp.model:
        chunk.eval()
    tracker = comp.load_tracker
    if tracker is not None:
        tracker.begin_eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    for i in range(vset.batches):
        totals += _eval_batch_totals(comp, dataset, i * gbs)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Ranks without the loss (not the last PP stage) add zeros; TP replicas add the same
        # sum and count, which leaves the ratio unchanged.
        dist.all_reduce(totals)
    for chunk in comp.model:
        chunk.train()
    loss = float(totals[0] / totals[1].clamp(min=1))
    result: dict[str, Any] = {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": vset.samples * comp.cfg.model.seq_length,
        "eval_set": vset.to_json(),
    }
    if tracker is not None:
        result["moe"] = tracker.end_eval()
    return result


# ----------------------------------------------------------------------------- loop


def train(comp: Components, callbacks: Iterable[Callback] = ()) -> list[dict[str, Any]]:
    """Run iterations until ``--train-iters``; returns ``{iteration, loss, lr, grad_norm}`` of
    every iteration of this call (plus ``valid_loss`` at evaluation iterations).

    ``callbacks`` are called at the named points of :mod:`megatron_wsm.callbacks`, in list
    order: after every step (logging, saving), at each periodic evaluation (more evaluations
    to log beside it, then their logging) and at exit, also when the loop raises.
    """
    cfg = comp.cfg.training
    points = CallbackList(callbacks)
    history: list[dict[str, Any]] = []
    error: BaseException | None = None
    try:
        while comp.state.iteration < cfg.train_iters:
            result = train_step(comp)
            if not math.isfinite(result.loss):
                raise FloatingPointError(
                    f"loss is {result.loss} at iteration {comp.state.iteration}; stopping "
                    "(lower --lr, or check the data)"
                )
            history.append(
                {
                    "iteration": comp.state.iteration,
                    "loss": result.loss,
                    "lr": result.learning_rate,
                    "grad_norm": result.grad_norm,
                }
            )
            points.after_step(comp, result)
            if cfg.eval_interval and comp.state.iteration % cfg.eval_interval == 0:
                live = evaluate(comp)
                # The held-out loss joins that iteration's row (curves from --output-json).
                history[-1]["valid_loss"] = live["loss"]
                points.at_evaluation(comp, live)
            if should_exit(comp):
                print_rank0(f"exiting at iteration {comp.state.iteration} (--exit-interval)")
                break
    except BaseException as e:
        error = e
        raise
    finally:
        # Pending saves are finalised and locks released by the callbacks, error or not.
        points.at_exit(comp, error)
    return history


def should_exit(comp: Components) -> bool:
    """True after the iteration at which ``--exit-interval`` asks the run to stop."""
    n = comp.cfg.training.exit_interval
    return bool(n) and comp.state.iteration % n == 0


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON on rank 0."""
    if wdist.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
