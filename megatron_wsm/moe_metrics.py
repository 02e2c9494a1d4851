"""MoE load-balance violation metrics: router hooks -> expert counts -> violations.

Here: the router hooks (:class:`ExpertLoadTracker`) and the reduction over ranks; the metric
names and the pure violation arithmetic are in :mod:`megatron_wsm.moe_violations` (re-exported).

Definitions (docs/metrics.md). For one MoE layer with ``E`` experts and ``Load_e`` = number of
(token, expert) assignments the router made to expert ``e`` over a token set (with top-k routing
``sum_e Load_e = k * T``), ``mean = sum_e Load_e / E`` and::

    max_violation = (max_e Load_e - mean) / mean      (MaxVio, DeepSeek arXiv:2408.15664)
    min_violation = (mean - min_e Load_e) / mean

*Global* violations take the ratio of counts summed over a whole window (a logging interval in
training, the whole held-out set in evaluation); *batch* violations take the ratio per global
batch and average the ratios over the batches of the window.

Conventions:

* **Layer numbers are global and 1-based**, exactly megatron-core's
  ``TransformerLayer.layer_number`` (which already includes the pipeline / virtual-pipeline
  offset, unlike the stage-local index in module names). Count tensors have shape
  ``[L, E]`` with ``L = num_layers`` and row ``i - 1`` holding layer ``i``. Rows of dense layers
  (``moe_layer_freq``) and of layers owned by another pipeline stage stay zero locally; after the
  world reduction (:func:`reduce_counts`) every MoE layer's row is filled on every rank.
* A MoE layer is one whose row is non-zero (every token routed through a MoE layer adds ``k``
  to its row), unless the caller passes ``moe_layers`` explicitly (:func:`moe_layer_numbers`
  derives them from ``moe_layer_freq``). Means over layers are taken over MoE layers only.
* An all-zero load (a layer that saw no token) has violation **0.0**: all loads are equal, and
  with that convention "violation == 0 iff all loads are equal" holds without exception.
* Counts are what the router outputs *after* top-k selection and, when a capacity factor is set,
  after token dropping (``routing_map``). Padding tokens (``padding_mask``) are excluded.
  Multi-token-prediction (MTP) layers are not part of the metric (their routers are not hooked).

In the trainer, :class:`ExpertLoadCallback` ends each global batch, the log callback
(``log_callback.py``) writes the interval metrics and ``training.evaluate`` counts evaluations.
Typical use (``end_batch`` / ``end_eval`` are collectives: every rank calls them)::

    tracker = ExpertLoadTracker.for_model(model_chunks, transformer_config)
    for step in ...:
        forward_backward(...)                  # hooks count each micro-batch, on device
        tracker.end_batch()                    # one small all-reduce per global batch
        if step % log_interval == 0:
            metrics = tracker.interval_metrics()     # tag -> float, no collective
            tracker.write_histograms(writer, step)   # optional
            tracker.reset_interval()
    tracker.begin_eval()                       # or: with tracker.evaluating(): ...
    run_eval(...)                              # model.eval(), no_grad: counted apart
    result["moe"] = tracker.end_eval()         # JSON-friendly dict, see eval_summary
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
import torch.distributed as dist

from megatron_wsm.callbacks import Callback
from megatron_wsm.moe_violations import (  # noqa: F401 - re-exported: one import path
    CONSOLE_TAGS,
    MEAN_BATCH_MAX_VIOLATION,
    MEAN_BATCH_MIN_VIOLATION,
    MEAN_GLOBAL_MAX_VIOLATION,
    MEAN_GLOBAL_MIN_VIOLATION,
    BatchViolationAccumulator,
    console_name,
    eval_summary,
    expert_load_tag,
    format_console,
    global_max_violation_tag,
    global_min_violation_tag,
    histograms,
    max_violation,
    min_violation,
    moe_layer_numbers,
    summarize,
    tag_index,
    violations,
)

if TYPE_CHECKING:  # the trainer's types only: this module stays usable without it
    from megatron_wsm.run_state import Components, StepResult

__all__ = [
    "CONSOLE_TAGS",
    "MEAN_BATCH_MAX_VIOLATION",
    "MEAN_BATCH_MIN_VIOLATION",
    "MEAN_GLOBAL_MAX_VIOLATION",
    "MEAN_GLOBAL_MIN_VIOLATION",
    "BatchViolationAccumulator",
    "ExpertLoadCallback",
    "ExpertLoadTracker",
    "console_name",
    "eval_summary",
    "expert_load_tag",
    "format_console",
    "global_max_violation_tag",
    "global_min_violation_tag",
    "histograms",
    "max_violation",
    "min_violation",
    "moe_layer_numbers",
    "reduce_counts",
    "reduce_fn_for_config",
    "summarize",
    "violations",
]

# ---------------------------------------------------------------------------------------------
# Distributed reduction.
# ---------------------------------------------------------------------------------------------


def reduce_counts(
    counts: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    tp_size: int = 1,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Sum local ``[L, E]`` counts over every rank of ``group`` (default: the whole world).

    Why a plain world sum is right: data-, context- and expert-parallel ranks route different
    tokens (expert parallelism is carved out of the data-parallel ranks, and the router runs on
    every rank for its own tokens); with sequence parallelism each tensor-parallel rank routes
    its own sequence shard; pipeline stages fill only the rows of the layers they own, so the
    sum also gathers the layers of all stages. Only tensor parallelism WITHOUT sequence
    parallelism replicates tokens: all ``tp_size`` ranks of a TP group route the same tokens, so
    the sum counts each of them exactly ``tp_size`` times and is divided back (exactly, integer
    division). megatron-core forbids TP>1 without SP for MoE *training*, so this case only
    appears in evaluation-style forwards, but it is handled.

    Args:
        counts: local counts (int64; CPU or CUDA). Not modified.
        group: process group to reduce over; None = default (world) group.
        tp_size: tensor-model-parallel size.
        sequence_parallel: whether sequence parallelism is on.

    Returns:
        A new tensor on ``counts.device`` with the global counts. Collective: every rank of the
        group must call it, in the same order. No host sync on NCCL.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    out = counts.detach().clone()
    if not (dist.is_available() and dist.is_initialized()):
        if tp_size != 1:
            raise RuntimeError("tp_size > 1 requires an initialised torch.distributed")
        return out
    if dist.get_world_size(group) == 1:
        pass  # a one-rank sum is the identity: skip the collective (~0.1 ms a step on gloo)
    elif out.is_cuda and dist.get_backend(group) == "gloo":
        # gloo cannot reduce CUDA int64 tensors: go through the host (only on gloo setups).
        host = out.cpu()
        dist.all_reduce(host, op=dist.ReduceOp.SUM, group=group)
        out.copy_(host)
    else:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    if tp_size > 1 and not sequence_parallel:
        if out.is_floating_point():
            out /= tp_size
        else:
            out = torch.div(out, tp_size, rounding_mode="floor")
    return out


def reduce_fn_for_config(config: Any, group: dist.ProcessGroup | None = None) -> Callable:
    """:func:`reduce_counts` bound to a megatron ``TransformerConfig``'s TP size and SP flag."""
    return functools.partial(
        reduce_counts,
        group=group,
        tp_size=int(getattr(config, "tensor_model_parallel_size", 1) or 1),
        sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
    )



# ---------------------------------------------------------------------------------------------
# The router hook.
# ---------------------------------------------------------------------------------------------


def _in_autograd_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    A router forward that runs inside backward is activation recomputation (megatron's
    ``tensor_parallel.checkpoint``, TE's checkpoint, ``torch.utils.checkpoint`` reentrant or
    not): those tokens were already counted by the original forward. The engine exposes the
    running graph task only through this private hook (present since torch 1.x, checked in
    ``attach``); it is -1 outside backward.
    """
    return torch._C._current_graph_task_id() != -1


def _router_classes() -> tuple[type, ...]:
    # Imported lazily so the pure functions above work without megatron-core installed.
    from megatron.core.transformer.moe.router import Router

    return (Router,)


ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertLoadTracker:
    """Counts tokens per expert for every MoE layer via forward hooks on megatron-core routers.

    Accumulators (all ``[L, E]`` int64 on the routers' device; ``L = num_layers``):

    * *batch*: local counts of the current global batch (training forwards only);
    * *interval*: GLOBAL counts summed over the batches ended since :meth:`reset_interval`;
    * per-batch violation sums (:class:`BatchViolationAccumulator`);
    * *eval*: local counts of the forwards between :meth:`begin_eval` and :meth:`end_eval`.

    Counting rules of the hook: a router forward that runs inside autograd's backward
    (activation recomputation) is never counted; outside evaluation only routers in training
    mode (``module.training``) count, so ``model.eval()`` forwards leave the training numbers
    alone; during evaluation every forward counts, into the eval accumulator only. The hook
    only adds on device: no host sync per micro-batch.

    Collective methods (every rank must call them, in the same order): :meth:`end_batch`,
    :meth:`end_eval`, :meth:`eval_counts` (when a reduction is configured). Everything else is
    local.
    """

    def __init__(self) -> None:
        """Create a detached tracker; call :meth:`attach` (or use :meth:`for_model`)."""
        self.num_layers = 0
        self.num_experts = 0
        self.topk = 0
        #: Global 1-based numbers of the MoE layers whose routers live on this rank.
        self.local_moe_layers: list[int] = []
        #: Local -> global counts; None = no reduction (single process).
        self.reduce_fn: ReduceFn | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._evaluating = False
        self._device = torch.device("cpu")
        self._batch = torch.zeros(0, 0, dtype=torch.int64)
        self._interval = torch.zeros(0, 0, dtype=torch.int64)
        self._eval = torch.zeros(0, 0, dtype=torch.int64)
        self._batch_stats = BatchViolationAccumulator(0)

    # -- setup -----------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls,
        model_chunks: torch.nn.Module | Iterable[torch.nn.Module],
        config: Any,
        *,
        reduce_fn: ReduceFn | None = None,
    ) -> ExpertLoadTracker:
        """A tracker attached to ``model_chunks`` with sizes from a ``TransformerConfig``.

        ``reduce_fn`` defaults to :func:`reduce_fn_for_config` (world sum, TP division without
        SP) when ``torch.distributed`` is initialised, else to no reduction.
        """
        if reduce_fn is None and dist.is_available() and dist.is_initialized():
            reduce_fn = reduce_fn_for_config(config)
        tracker = cls()
        tracker.attach(
            model_chunks,
            num_layers=config.num_layers,
            num_experts=config.num_moe_experts,
            topk=config.moe_router_topk,
            reduce_fn=reduce_fn,
        )
        return tracker

    def attach(
        self,
        model_chunks: torch.nn.Module | Iterable[torch.nn.Module],
        *,
        num_layers: int,
        num_experts: int,
        topk: int,
        reduce_fn: ReduceFn | None = None,
    ) -> list[int]:
        """Hook every megatron-core ``Router`` (e.g. ``TopKRouter``) in ``model_chunks``.

        Args:
            model_chunks: a model or the list of (virtual-pipeline) chunks, wrapped or not.
            num_layers: total transformer layers of the model (all pipeline stages), = L.
            num_experts: experts per MoE layer, = E.
            topk: router top-k (checked against the routers).
            reduce_fn: local -> global counts, used by :meth:`end_batch` / :meth:`end_eval`.
                None: :func:`reduce_fn_for_config` of a hooked router's config when
                ``torch.distributed`` is initialised (a rank without any router then needs an
                explicit one), no reduction otherwise.

        Returns:
            The global 1-based layer numbers of the MoE layers hooked on this rank (possibly
            empty, e.g. a pipeline stage with only dense layers).

        Raises:
            ValueError: a router without ``layer_number``, a duplicate layer, a
                num_experts / topk mismatch, or no way to choose the reduction.
        """
        if self._handles:
            raise RuntimeError("tracker already attached; call detach() first")
        if not hasattr(torch._C, "_current_graph_task_id"):
            raise RuntimeError("this torch has no _current_graph_task_id: cannot detect recompute")
        if isinstance(model_chunks, torch.nn.Module):
            model_chunks = [model_chunks]
        routers = self._find_routers(model_chunks, num_layers, num_experts, topk)
        config = next((getattr(r, "config", None) for r in routers.values()), None)
        if reduce_fn is None and dist.is_available() and dist.is_initialized():
            if config is not None:
                reduce_fn = reduce_fn_for_config(config)
            elif dist.get_world_size() > 1:
                raise ValueError(
                    "no router on this rank to read TP/SP from: pass reduce_fn (or use for_model)"
                )
        if getattr(config, "cuda_graph_impl", "none") not in (None, "none") or getattr(
            config, "enable_cuda_graph", False
        ):
            # Python hooks do not run on CUDA-graph replay: counts would be silently wrong.
            warnings.warn(
                "CUDA graphs are enabled: expert-load counts are not reliable", stacklevel=2
            )
        device = None
        for module in routers.values():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                device = weight.device
                break
        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        self.reduce_fn = reduce_fn
        self._device = device if device is not None else torch.device("cpu")
        zeros = functools.partial(
            torch.zeros, num_layers, num_experts, dtype=torch.int64, device=self._device
        )
        self._batch, self._interval, self._eval = zeros(), zeros(), zeros()
        self._batch_stats = BatchViolationAccumulator(num_layers, self._device)
        for layer, module in sorted(routers.items()):
            self._handles.append(
                module.register_forward_hook(self._make_hook(layer - 1), with_kwargs=True)
            )
        self.local_moe_layers = sorted(routers)
        return list(self.local_moe_layers)

    @staticmethod
    def _find_routers(
        model_chunks: Iterable[torch.nn.Module], num_layers: int, num_experts: int, topk: int
    ) -> dict[int, torch.nn.Module]:
        """Global layer number -> router module, checked."""
        router_cls = _router_classes()
        routers: dict[int, torch.nn.Module] = {}
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if not isinstance(module, router_cls) or any(module is r for r in routers.values()):
                    continue
                # layer_number is set by the owning TransformerLayer (MoELayer.set_layer_number)
                # and is global: it already includes the pipeline / virtual-pipeline offset,
                # unlike the stage-local index in the module name.
                layer = getattr(module, "layer_number", None)
                if layer is None:
                    raise ValueError(f"router {name!r} has no layer_number")
                layer = int(layer)
                if layer > num_layers:
                    # Multi-token-prediction layers are numbered after the decoder's layers;
                    # they are not part of the model's load-balance metric.
                    warnings.warn(
                        f"not tracking router {name!r} (layer {layer} > {num_layers})",
                        stacklevel=3,
                    )
                    continue
                if layer < 1:
                    raise ValueError(f"router {name!r} has layer_number {layer} < 1")
                if layer in routers:
                    raise ValueError(f"two routers claim layer {layer}")
                n_exp = getattr(module, "num_experts", num_experts)
                if n_exp != num_experts:
                    raise ValueError(f"router {name!r} has {n_exp} experts, not {num_experts}")
                r_topk = getattr(module, "topk", topk)
                if r_topk != topk:
                    raise ValueError(f"router {name!r} has topk {r_topk}, not {topk}")
                routers[layer] = module
        return routers

    def detach(self) -> None:
        """Remove the hooks (the accumulated numbers stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, row: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_autograd_backward():
                return  # activation recomputation: already counted by the first forward
            if self._evaluating:
                target = "_eval"
            elif module.training:
                target = "_batch"
            else:
                return  # an eval forward outside evaluation: not a training token
            routing_map = output[1]  # TopKRouter.forward -> (probs, routing_map [T, E] bool)
            padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                if padding_mask is not None:
                    # megatron-core: padding_mask True = padding, flattened like the tokens.
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1).bool()
                local = routing_map.sum(0)  # bool sum -> int64 [E], stays on device
                if local.device != self._device:
                    self._move_to(local.device)
                getattr(self, target)[row].add_(local)

        return hook

    def _move_to(self, device: torch.device) -> None:
        # Routers may be moved (e.g. model.cuda(), or megatron moving CPU-initialised router
        # weights to the GPU on first use) after attach: follow them once.
        self._device = device
        self._batch = self._batch.to(device)
        self._interval = self._interval.to(device)
        self._eval = self._eval.to(device)

    def _reduce(self, counts: torch.Tensor, reduce_fn: ReduceFn | None) -> torch.Tensor:
        fn = reduce_fn if reduce_fn is not None else self.reduce_fn
        return fn(counts) if fn is not None else counts.clone()

    # -- training ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero every accumulator (batch, interval, batch violations, eval)."""
        self._batch.zero_()
        self._eval.zero_()
        self.reset_interval()

    def local_counts(self) -> torch.Tensor:
        """Local, unreduced counts of the current mode: ``[L, E]`` int64 (a copy).

        In training: the current global batch so far (since the last :meth:`end_batch`);
        during evaluation: the evaluation so far. Rows of dense layers and of layers of other
        pipeline stages are zero.
        """
        return (self._eval if self._evaluating else self._batch).clone()

    def end_batch(self, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
        """Close a global batch: reduce its counts once, record its violations, add to interval.

        Collective: call on every rank after the forward/backward of all micro-batches of the
        step (one all-reduce of ``L * E`` int64 per step; no host sync on NCCL).

        Args:
            reduce_fn: overrides :attr:`reduce_fn` for this call.

        Returns:
            The batch's global counts ``[L, E]``.
        """
        batch = self._reduce(self._batch, reduce_fn)
        self._batch_stats.add(batch)
        self._interval += batch.to(self._interval.device)
        self._batch.zero_()
        return batch

    @property
    def num_batches(self) -> int:
        """Global batches ended since the last :meth:`reset_interval`."""
        return self._batch_stats.num_batches

    def interval_counts(self) -> torch.Tensor:
        """GLOBAL counts ``[L, E]`` summed over the batches since :meth:`reset_interval` (copy)."""
        return self._interval.clone()

    def interval_metrics(self, moe_layers: Sequence[int] | None = None) -> dict[str, float]:
        """Tag -> value for the interval: global per-layer and mean violations + batch means.

        No collective (the counts are already global after :meth:`end_batch`): any rank can
        call it and gets the same numbers. Empty when no batch was ended.
        """
        if self._batch_stats.num_batches == 0:
            return {}
        out = summarize(self._interval, moe_layers)
        out.update(self._batch_stats.summary(moe_layers))
        return out

    def interval_histograms(
        self, moe_layers: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Histogram tag -> per-expert load of the interval, for ``SummaryWriter.add_histogram``."""
        return histograms(self._interval, moe_layers)

    def write_histograms(
        self, writer: Any, step: int, moe_layers: Sequence[int] | None = None
    ) -> None:
        """``writer.add_histogram(expert_load_tag(i), load, step)`` for each MoE layer."""
        for tag, load in self.interval_histograms(moe_layers).items():
            writer.add_histogram(tag, load, step)

    def reset_interval(self) -> None:
        """Start a new logging interval (global counts and batch violations). Local."""
        self._interval.zero_()
        self._batch_stats.reset()

    # -- evaluation --------------------------------------------------------------------------

    def begin_eval(self) -> None:
        """Count the following forwards into a fresh eval accumulator (training ones untouched).

        Counting then happens whatever ``module.training`` and ``torch.no_grad`` say.
        """
        self._eval.zero_()
        self._evaluating = True

    def end_eval(self, moe_layers: Sequence[int] | None = None) -> dict[str, Any]:
        """Stop eval counting and return :func:`eval_summary` of the GLOBAL eval counts.

        Collective when a reduction is configured (every rank gets the same dict).
        """
        self._evaluating = False
        return eval_summary(self.eval_counts(), moe_layers)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[ExpertLoadTracker]:
        """Context-manager form of :meth:`begin_eval`; read with :meth:`eval_counts`."""
        previous = self._evaluating
        self.begin_eval()
        try:
            yield self
        finally:
            self._evaluating = previous

    def eval_counts(self, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
        """GLOBAL counts of the last evaluation (collective when a reduction is configured)."""
        return self._reduce(self._eval, reduce_fn)


class ExpertLoadCallback(Callback):
    """Ends the global batch of ``comp.load_tracker`` after every training step (its counts
    reduced over ranks, the batch violations added to the logging interval); nothing when the
    run has no tracker (dense model, ``--no-moe-metrics``).

    List it before the log callback: the interval it emits must include this step's batch.
    """

    def after_step(self, comp: Components, result: StepResult) -> None:
        """:meth:`ExpertLoadTracker.end_batch` (a collective: every rank, every step)."""
        if comp.load_tracker is not None:
            comp.load_tracker.end_batch()
