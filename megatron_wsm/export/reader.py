"""Read global tensors of a torch_dist checkpoint offline, one slice at a time.

No process group, no megatron-core model: the ``.metadata`` is read with the restricted
unpickler of :mod:`megatron_wsm.checkpoint.integrity` and checked against the shard files
first; then each request ("key ``K`` at leading index ``(layer, expert)``") becomes a torch DCP
load plan for exactly the stored chunks that overlap that slice. Memory is one slice (a layer's
QKV, one expert's ``linear_fc1``) plus the chunks overlapping it, never the whole model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.export.mapping import ExportError

#: Optimizer state keys: ``optimizer.…``, or ``chained_N.optimizer.…`` when megatron-core chains
#: one optimizer per parameter group (dense and expert parameters with EP).
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


class _TrustedMetadataReader(FileSystemReader):
    """A FileSystemReader that uses metadata we already read safely (no plain ``pickle``)."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class _SlicePlanner(LoadPlanner):
    """Load plan for one rectangular slice of one global tensor into ``dest``."""

    def __init__(self, fqn: str, chunk: ChunkStorageMetadata, dest: torch.Tensor) -> None:
        self.fqn, self.chunk, self.dest = fqn, chunk, dest

    def set_up_planner(
        self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False, **kwargs: Any
    ) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.fqn]
        return LoadPlan(create_read_items_for_chunk_list(self.fqn, md, [self.chunk]))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:  # pragma: no cover
        raise ExportError(f"{self.fqn}: unexpected bytes item in a tensor load")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.dest
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            if off != 0 or length != out.shape[dim]:
                out = out.narrow(dim, off, length)
        return out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor hands out views of dest: the reader copied into it already


class CheckpointReader:
    """Global tensors of a torch_dist checkpoint directory, read slice by slice."""

    def __init__(self, path: str | os.PathLike) -> None:
        """Read and check ``path``'s metadata; raises :class:`ExportError` on any problem."""
        self.path = Path(path)
        # lexists: a FIFO or symlink in its place is refused by load_metadata, by name.
        if not os.path.lexists(self.path / ckpt_integrity.METADATA_FILE):
            raise ExportError(
                f"{self.path} is not a torch_dist checkpoint (no {ckpt_integrity.METADATA_FILE})"
            )
        try:
            self.metadata = ckpt_integrity.load_metadata(self.path)
        except ckpt_integrity.IntegrityError as e:
            raise ExportError(f"{self.path}: {e}") from e
        # Shard files are regular files of this directory (no FIFO, no symlink out of it) that
        # hold every byte range: torch's reader, used below, follows whatever is there.
        problems = ckpt_integrity.storage_problems(self.path, self.metadata)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportError(f"{self.path} is damaged: {problems[0]}{more}")
        self._reader = _TrustedMetadataReader(self.path, self.metadata)
        self._last: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None

    def model_tensors(self) -> dict[str, tuple[int, ...]]:
        """Floating-point model tensors (not optimizer state) → global shape."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata) or _OPTIMIZER_KEY.match(key):
                continue
            if "/" in key or not md.properties.dtype.is_floating_point:
                continue
            out[key] = tuple(md.size)
        return out

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """``checkpoint[key][index]`` (leading indices), in its stored dtype.

        The last slice is cached: q/k/v and gate/up come from one read.
        """
        if self._last is not None and self._last[0] == (key, index):
            return self._last[1]
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ExportError(f"checkpoint has no tensor {key}")
        size = tuple(md.size)
        if len(index) > len(size) or any(not 0 <= i < n for i, n in zip(index, size)):
            raise ExportError(f"{key}: index {index} outside global shape {size}")
        offsets = torch.Size([*index, *([0] * (len(size) - len(index)))])
        sizes = torch.Size([*([1] * len(index)), *size[len(index) :]])
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        planner = _SlicePlanner(key, ChunkStorageMetadata(offsets=offsets, sizes=sizes), dest)
        self._last = None  # free the previous slice before the load allocates chunk buffers
        _load_state_dict({}, storage_reader=self._reader, planner=planner, no_dist=True)
        out = dest.reshape(size[len(index) :])
        self._last = ((key, index), out)
        return out
