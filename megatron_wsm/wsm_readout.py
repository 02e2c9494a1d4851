"""The WSM merge of a window, built in memory and swapped into the live model for evaluation.

``merge_wsm.py --load-dir`` writes a merge to disk and ``evaluate.py`` reads it back; this module
does the same arithmetic without the disk round trip, so the trainer can report the merged
readout at every evaluation (``--wsm-eval-methods``) and ``evaluate.py --load-dir`` can score a
merge that was never written. Each rank reads only its own part of the model (its TP/PP/EP
shards, in its own layout: megatron-core's ``dist_checkpointing.load`` reshards) and accumulates
in fp32, exactly like the merge tool: ``c_0 * x_0`` then ``+= c_j * x_j`` oldest first,
inputs of weight 0 not read. The window and its coefficients come from the merge tool's own
functions (:func:`megatron_wsm.merge.choose_window`, :func:`~megatron_wsm.merge.input_positions`,
:func:`~megatron_wsm.merge.method_coefficients`), so both pick the same checkpoints and weights.

Memory: one fp32 accumulator of the rank's floating-point model tensors plus one read buffer of
them in the model's dtype (the reads in flight). The live weights are kept, bit-exact, in the
accumulator while the merged ones are in the model (:func:`swap_weights`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch

from megatron_wsm import distributed as wdist
from megatron_wsm.coefficients import MergeMethod


class ReadoutError(RuntimeError):
    """The window cannot be merged (yet); the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class WindowMerge:
    """Which checkpoints a merge averages, oldest first, and with which coefficients."""

    method: MergeMethod
    paths: tuple[str, ...]
    positions: tuple[int, ...]
    position_unit: str
    coefficients: tuple[float, ...]
    notes: tuple[str, ...] = ()

    @property
    def newest_path(self) -> str:
        """The newest input (its manifest describes the model and the run)."""
        return self.paths[-1]

    def to_json(self) -> dict[str, Any]:
        """What a readout reports about its merge."""
        return {
            "method": self.method.to_json(),
            "inputs": list(self.paths),
            "positions": list(self.positions),
            "position_unit": self.position_unit,
            "coefficients": list(self.coefficients),
        }


def plan_window_merge(
    window_dir: str | Path,
    method: MergeMethod,
    *,
    window_iters: int | None = None,
    window_tokens: int | None = None,
    count: int | None = None,
    skip_incomplete: bool = False,
    positions_from: str = "iteration",
    allow_no_manifest: bool = False,
) -> WindowMerge:
    """The merge ``merge_wsm.py --load-dir window_dir`` would do with these options.

    Collective when a process group exists (rank 0 reads the manifests and shares the answer).
    Raises :class:`ReadoutError` where the merge tool refuses.
    """
    from megatron_wsm.merge import MergeError, choose_window, input_positions, method_coefficients
    from megatron_wsm.merge.common import Comm

    def choose() -> list[str]:
        selection = choose_window(
            window_dir,
            window_iters=window_iters,
            window_tokens=window_tokens,
            count=count,
            skip_incomplete=skip_incomplete,
        )
        return [str(p) for p in selection.paths]

    try:
        paths = Comm().run_on_rank0(choose)
        where = input_positions(
            paths, positions_from=positions_from, allow_no_manifest=allow_no_manifest
        )
        coefficients = method_coefficients(method, where.positions, positions_from)
    except (MergeError, ValueError) as e:
        raise ReadoutError(str(e).splitlines()[0]) from e
    return WindowMerge(
        method=method,
        paths=tuple(where.paths),
        positions=tuple(where.positions),
        position_unit=where.unit,
        coefficients=tuple(coefficients),
        notes=tuple(where.notes),
    )


# ----------------------------------------------------------------------------- tensors


def _read_request(model_sd: dict[str, Any]) -> dict[str, Any]:
    """The floating-point entries of a model's sharded state dict, each pointed at a fresh
    buffer of its shape and dtype.

    megatron-core loads *into* the tensors a request holds, and a model's sharded state dict
    holds the live parameters: reading a window checkpoint through it would overwrite the
    weights being trained. Non-float entries (``_extra_state``, integer buffers) are left out:
    like the merge tool, the merge keeps the newest checkpoint's, which are the live ones.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    request: dict[str, Any] = {}
    for key, entry in model_sd.items():
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            data = entry.data
            if data is not None and data.is_floating_point():
                request[key] = dataclasses.replace(entry, data=torch.empty_like(data.detach()))
    return request


def _live_tensors(bare_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict key → the model's own parameter or buffer (what the merge replaces)."""
    return {
        k: v for k, v in bare_model.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor)  # TE's _extra_state is an object, not a tensor
    }


def merged_tensors(
    bare_model: torch.nn.Module,
    plan: WindowMerge,
    *,
    verify: Callable[[Path], None] | None = None,
    adapt: Callable[[dict[str, Any], Path], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_j c_j · (this rank's part of input j) in fp32, keyed like ``bare_model.state_dict()``.

    Collective (every rank of the model calls it). ``verify(path)`` runs before each read
    (the trainer's restricted-unpickling and CRC check); ``adapt(request, path)`` renames the
    request's keys to the checkpoint's (either transformer-layer spec). Raises
    :class:`ReadoutError` when a merged tensor is not finite, like the merge tool.
    """
    from megatron.core import dist_checkpointing

    live = _live_tensors(bare_model)
    acc: dict[str, torch.Tensor] = {}
    for path, coef in zip(plan.paths, plan.coefficients):
        if coef == 0.0:
            continue  # the merge tool does not read inputs of weight 0 either
        ckpt = Path(path)
        if verify is not None:
            verify(ckpt)
        request = {"model": _read_request(bare_model.sharded_state_dict())}
        if adapt is not None:
            adapt(request, ckpt)
        loaded = dist_checkpointing.load(request, str(ckpt))["model"]
        for key, value in loaded.items():
            if key not in live:
                continue
            x = value.detach().float()
            if key in acc:
                acc[key].add_(x, alpha=coef)
            else:
                acc[key] = torch.mul(x, coef)
    missing = sorted(k for k, t in live.items() if t.is_floating_point() and k not in acc)
    if missing:
        raise ReadoutError(f"the window checkpoints lack {len(missing)} tensor(s), e.g. "
                           f"{missing[0]}")
    bad = [k for k, t in acc.items() if not math.isfinite(float(t.sum()))]
    if not wdist.all_ranks_true(not bad):
        raise ReadoutError(
            "the merged weights are not finite" + (f" ({bad[0]})" if bad else " on another rank")
        )
    return acc


def swap_weights(bare_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Exchange the model's values with ``tensors`` in place, tensor by tensor.

    The model gets ``tensors`` (cast to its dtype, as the merge tool's ``--output-dtype same``
    writes them) and ``tensors`` get the model's values. Calling it twice restores the model
    bit-exactly: the accumulator is fp32, which holds fp32, bf16 and fp16 values exactly. The
    parameters stay the same tensors (views into megatron-core's contiguous buffers stay valid);
    the extra memory is one tensor at a time.
    """
    live = _live_tensors(bare_model)
    with torch.no_grad():
        for key, other in tensors.items():
            target = live[key]
            held = target.detach().clone()
            target.detach().copy_(other)
            other.copy_(held)


@contextmanager
def swapped_in(bare_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model holds ``tensors`` inside the block; its own weights again after it, even
    when the block raises."""
    swap_weights(bare_model, tensors)
    try:
        yield
    finally:
        swap_weights(bare_model, tensors)


def load_merged_weights(
    bare_model: torch.nn.Module, plan: WindowMerge, **kwargs: Any
) -> None:
    """Replace the model's weights by the merge of ``plan`` (``evaluate.py --load-dir``)."""
    tensors = merged_tensors(bare_model, plan, **kwargs)
    swap_weights(bare_model, tensors)
