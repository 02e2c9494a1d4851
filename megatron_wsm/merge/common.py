"""Shared pieces of the merge: the error type, the report, and the merge ranks' collectives."""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MergeError(RuntimeError):
    """The merge refuses its inputs or failed; the message is one line meant for the user."""


@dataclasses.dataclass
class MergeReport:
    """What a merge did (returned by :func:`megatron_wsm.merge.merge_checkpoints`)."""

    output: str
    format: str
    inputs: list[dict[str, Any]]
    coefficients: list[float]
    implied_decay: list[float]
    output_dtype: str
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    merge_ranks: int = 1
    averaged_keys: list[str] = dataclasses.field(default_factory=list)
    copied_keys: list[str] = dataclasses.field(default_factory=list)
    dropped_keys: list[str] = dataclasses.field(default_factory=list)
    buffer_bytes_per_rank: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        """A few human-readable lines (what the CLI prints)."""
        verb = "would merge" if self.dry_run else "merged"
        lines = [
            f"{verb} {len(self.inputs)} {self.format} checkpoints -> {self.output}",
            f"  averaged {len(self.averaged_keys)} tensors, copied {len(self.copied_keys)} "
            f"from the newest input, dropped {len(self.dropped_keys)} (optimizer and RNG state)",
            f"  read {_gib(self.bytes_read)}, wrote {_gib(self.bytes_written)}"
            + ("" if self.dry_run else f" in {self.seconds:.1f} s with {self.merge_ranks} rank(s)"),
        ]
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"


class Comm:
    """The merge ranks: torch.distributed when initialised (any backend), else one rank.

    Every collective here is an object collective so the merge works on CPU with gloo; the
    payloads are small (plans, CRCs, error strings), never tensor data.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = group
        if self._dist is None:
            self.rank, self.size = 0, 1
        else:
            self.rank = self._dist.get_rank(group)
            self.size = self._dist.get_world_size(group)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        src = self._dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait for every merge rank."""
        if self.size > 1:
            self._dist.barrier(group=self.group)

    def run_everywhere(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; if any rank fails, every rank raises the first error.

        This keeps ranks in lock-step: no rank is left waiting in a later collective because
        another one raised.
        """
        outcome = _capture(fn)
        outcomes = self.all_gather(outcome)
        for ok, value in outcomes:
            if not ok:
                raise MergeError(value)
        return [value for _, value in outcomes]

    def run_on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and share its result (or its error) with every rank."""
        outcome = _capture(fn) if self.rank == 0 else (True, None)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise MergeError(value)
        return value


def _capture(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except MergeError as e:
        return False, str(e)
    except (OSError, ValueError, RuntimeError) as e:
        # Expected failure classes (I/O, corrupt data) become one-line messages; the traceback
        # of anything else still reaches the user through the caller.
        return False, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a rank must report, not hang its peers
        return False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
