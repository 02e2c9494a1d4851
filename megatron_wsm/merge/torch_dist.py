"""Streaming, item-level weighted merge of torch_dist checkpoints.

Every input shares one layout, so the merged checkpoint has the same storage items as the
newest input: for an averaged tensor item, output bytes = Σ_j c_j · (the same item of input j).
The work is a list of *pieces* — a range of at most one chunk of elements of one item, or a byte
range of an item copied from the newest input — split into contiguous, equal-cost runs, one per
merge rank. A rank streams its pieces: read the piece's byte range from every input (``pread``
into a reused buffer), accumulate in fp32, cast, ``pwrite`` at the piece's precomputed offset in
the output file. The output layout (files, offsets, lengths) is fixed before any data moves, so
ranks never coordinate while streaming; rank 0 writes the small zip headers of each item (with
CRCs gathered from the ranks) and the new ``.metadata`` at the end.

Memory per rank: the streaming buffers (``chunk_bytes``, see :func:`piece_elements`) plus the
plan (a few hundred bytes per storage item); never a whole tensor, a whole model, or K of them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import queue
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_wsm import ckpt_integrity
from megatron_wsm.merge import dcp_format as fmt
from megatron_wsm.merge.common import Comm, MergeError
from megatron_wsm.merge.inputs import CheckpointInput

#: Keys of optimizer state in megatron-core's sharded state dict, whatever the optimizer:
#: ``optimizer.state.exp_avg.<param>`` (plain), ``optimizer.distributed.dp_group_idx_N.<...>``
#: (distributed optimizer), each behind ``chained_N.`` when a ChainedOptimizer (e.g. dense and
#: expert parameters) adds its prefix. Dropped by the merge: never averaged, never copied.
OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer(_state_dict)?\.")
#: The trainer's (and Megatron-LM's) per-rank RNG state, a ShardedObject: ``rng_state`` or
#: ``rng_state/shard_<offset>_<shape>``. Meaningless for a merged model; dropped.
RNG_KEY = re.compile(r"^rng_state($|[/.])")
#: Environment hook for tests: sleep this many seconds after each piece (to kill mid-merge).
DELAY_ENV = "MEGATRON_WSM_MERGE_TEST_DELAY"

ACTION_AVERAGE = "average"
ACTION_COPY = "copy"
ACTION_DROP = "drop"

_FP32 = torch.float32


def is_dropped(fqn: str) -> bool:
    """Whether a key is optimizer state or RNG state (dropped by the merge)."""
    return bool(OPTIMIZER_KEY.match(fqn) or RNG_KEY.match(fqn))


def classify(fqn: str, storage_md: Any) -> str:
    """What the merge does with one key: average float tensors, copy the rest, drop optimizer
    and RNG state."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if is_dropped(fqn):
        return ACTION_DROP
    if isinstance(storage_md, TensorStorageMetadata):
        if storage_md.properties.dtype.is_floating_point:
            return ACTION_AVERAGE
    return ACTION_COPY


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Item:
    """One storage item of the output and where its inputs are."""

    index: Any  # torch.distributed.checkpoint.metadata.MetadataIndex
    action: str
    out_file: str  # relative name (the newest input's file name)
    newest: tuple[str, int, int]  # absolute path, offset, length in the newest input
    sources: list[tuple[str, int, int] | None]  # per input (None: zero coefficient)
    in_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    numel: int = 0  # storage elements (average) — filled by inspection
    data_offsets: list[int | None] = dataclasses.field(default_factory=list)  # absolute
    #: CRC-32 each used input's zip stores for the item's storage bytes (checked while
    #: streaming: bit rot in an input must not be merged and hidden under a fresh CRC).
    data_crcs: list[int | None] = dataclasses.field(default_factory=list)
    template: fmt.BlobTemplate | None = None
    out_offset: int = -1
    out_length: int = 0

    @property
    def data_start(self) -> int:
        """Offset of the storage bytes in the output file."""
        assert self.template is not None
        return self.out_offset + len(self.template.prefix)


@dataclasses.dataclass
class Plan:
    """Everything every rank needs to stream its share and rank 0 to finish the output."""

    inputs: list[CheckpointInput]
    coefficients: list[float]
    metadata: Any  # newest input's DCP Metadata
    items: list[Item]
    actions: dict[str, str]  # fqn -> action, for every key of the newest input
    output_dtype: str
    notes: list[str]
    #: Compare the CRC-32 of every byte read with the one its input's zip records.
    verify_crc: bool = True
    #: The newest input's ``common.pt`` minus optimizer/RNG entries (None: it has none).
    common: Any = None

    def bytes_to_read(self) -> int:
        """Input bytes the merge reads (zero-coefficient inputs are skipped)."""
        total = 0
        for item in self.items:
            if item.action == ACTION_AVERAGE:
                total += sum(src[2] for src in item.sources if src is not None)
            else:
                total += item.newest[2]
        return total

    def bytes_to_write(self) -> int:
        """Bytes of the output's ``.distcp`` files."""
        return sum(item.out_length for item in self.items)

    def keys(self, action: str) -> list[str]:
        """The keys (fqns) handled with ``action``."""
        return sorted(k for k, a in self.actions.items() if a == action)


def _out_dtype(in_dtype: torch.dtype, output_dtype: str) -> torch.dtype:
    return {"same": in_dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[output_dtype]


def _few(keys: set[str] | list[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_metadata(inputs: list[CheckpointInput]) -> list[Any]:
    """Every input's DCP metadata, through the restricted unpickler (a crafted ``.metadata``
    cannot run code, not even in a dry run)."""
    metas = []
    for inp in inputs:
        if not inp.path.is_dir():
            raise MergeError(gone_message(inp.path))
        try:
            metas.append(ckpt_integrity.load_metadata(inp.path))
        except ckpt_integrity.IntegrityError as e:
            if not inp.path.is_dir():  # removed between the two checks
                raise MergeError(gone_message(inp.path)) from e
            raise MergeError(f"{e} (incomplete, corrupt or crafted checkpoint)") from e
    return metas


def gone_message(path: str | Path) -> str:
    """The error for an input that disappeared after it was checked (pruned by a trainer)."""
    return (
        f"{path}: disappeared during the merge (removed or pruned by the trainer's retention?); "
        "nothing was written"
    )


def check_metadata(inputs: list[CheckpointInput], metas: list[Any]) -> dict[str, str]:
    """Refuse inputs whose tensors differ in keys, shapes, dtypes or sharding; return actions."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ref, ref_path = metas[-1], inputs[-1].path
    actions = {k: classify(k, v) for k, v in ref.state_dict_metadata.items()}

    def tensors(md: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in md.state_dict_metadata.items()
            if not is_dropped(k) and not isinstance(v, BytesStorageMetadata)
        }

    def extra_states(md: Any) -> set[str]:
        return {
            k
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata) and "_extra_state" in k
        }

    ref_t, ref_x = tensors(ref), extra_states(ref)
    for inp, md in zip(inputs[:-1], metas[:-1]):
        cur = tensors(md)
        if cur.keys() != ref_t.keys():
            only_ref, only_cur = ref_t.keys() - cur.keys(), cur.keys() - ref_t.keys()
            raise MergeError(
                f"{inp.path} and {ref_path} hold different tensors (only in the newest: "
                f"{_few(only_ref) or '-'}; only in {inp.path.name}: {_few(only_cur) or '-'})"
            )
        if extra_states(md) != ref_x:
            raise MergeError(f"{inp.path} and {ref_path} differ in their _extra_state keys")
        for key, want in ref_t.items():
            _check_tensor(inp.path, ref_path, key, cur[key], want)
    if not any(a == ACTION_AVERAGE for a in actions.values()):
        raise MergeError(f"{ref_path}: no floating-point model tensors to merge")
    return actions


def _check_tensor(path: Path, ref_path: Path, key: str, got: Any, want: Any) -> None:
    if got.properties.dtype != want.properties.dtype:
        raise MergeError(
            f"{key}: dtype {got.properties.dtype} in {path} but {want.properties.dtype} in "
            f"{ref_path}"
        )
    if tuple(got.size) != tuple(want.size):
        raise MergeError(
            f"{key}: shape {tuple(got.size)} in {path} but {tuple(want.size)} in {ref_path}"
        )
    chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in got.chunks]
    want_chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in want.chunks]
    if sorted(chunks) != sorted(want_chunks):
        raise MergeError(
            f"{key}: sharded differently in {path} and {ref_path} (different parallel layout); "
            "merge needs one layout"
        )


def _skeleton_items(
    inputs: list[CheckpointInput],
    metas: list[Any],
    coefficients: list[float],
    actions: dict[str, str],
    output_dtype: str,
) -> list[Item]:
    """Items of the output with their source byte ranges; checks every range lies in its file."""
    ref = metas[-1]
    sizes: dict[str, int] = {}

    def locate(inp: CheckpointInput, md: Any, index: Any) -> tuple[str, int, int, str]:
        info = md.storage_data.get(index)
        if info is None:
            raise MergeError(f"{inp.path}: no storage item for {index.fqn} at {index.offset}")
        try:
            # Checked name first: a crafted relative_path (``../x.distcp``) must not make the
            # merge read outside the input, nor write outside --save (output names are these).
            rel, offset, length = ckpt_integrity.storage_location(info)
            fmt.storage_location(info)  # refuses transformed (e.g. compressed) items
        except (ckpt_integrity.IntegrityError, fmt.FormatError) as e:
            raise MergeError(f"{inp.path}: {index.fqn}: {e}") from e
        path = str(inp.path / rel)
        if path not in sizes:
            try:
                sizes[path] = os.stat(path).st_size
            except FileNotFoundError as e:
                if not inp.path.is_dir():
                    raise MergeError(gone_message(inp.path)) from e
                raise MergeError(f"{inp.path}: shard file {rel} is missing") from e
        if offset + length > sizes[path]:
            raise MergeError(
                f"{inp.path}: shard file {rel} is truncated ({sizes[path]} bytes, item "
                f"{index.fqn} needs {offset + length})"
            )
        return path, offset, length, rel

    items = []
    for index in ref.storage_data:
        action = actions.get(index.fqn, ACTION_COPY)
        if action == ACTION_DROP:
            continue
        *newest, rel = locate(inputs[-1], ref, index)
        sources: list[tuple[str, int, int] | None] = [None] * len(inputs)
        item = Item(index, action, rel, tuple(newest), sources)
        if action == ACTION_AVERAGE:
            for j, (inp, md) in enumerate(zip(inputs, metas)):
                *src, _ = locate(inp, md, index)  # checked even at coefficient 0 (integrity)
                sources[j] = tuple(src) if coefficients[j] != 0.0 else None
            item.in_dtype = ref.state_dict_metadata[index.fqn].properties.dtype
            item.out_dtype = _out_dtype(item.in_dtype, output_dtype)
        items.append(item)
    items.sort(key=lambda it: (it.out_file, it.newest[1]))
    return items


def _reader(path: str, offset: int) -> Callable[[int, int], bytes]:
    def read_at(pos: int, size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset + pos)
            return f.read(size)

    return read_at


def inspect_item(item: Item, inputs: list[CheckpointInput]) -> Item:
    """Parse the item's torch.save blob in every used input; fill offsets and the template."""
    if item.action != ACTION_AVERAGE:
        return item
    assert item.in_dtype is not None and item.out_dtype is not None
    blobs: list[fmt.TensorBlob | None] = []
    newest_reader = None
    for j, src in enumerate(item.sources):
        if src is None and j != len(item.sources) - 1:
            blobs.append(None)
            continue
        path, offset, length = src if src is not None else item.newest
        try:
            reader = fmt.BlobReader(_reader(path, offset), length)
            blob = fmt.describe_tensor_blob(reader)
        except fmt.FormatError as e:
            raise MergeError(f"{inputs[j].path}: item {item.index.fqn}: {e}") from e
        except FileNotFoundError as e:
            raise MergeError(gone_message(inputs[j].path)) from e
        _check_small_records(blob, reader, inputs[j].path, path, item.index.fqn)
        blobs.append(blob)
        newest_reader = reader
    newest = blobs[-1]
    assert newest is not None and newest_reader is not None
    isz = item.in_dtype.itemsize
    if newest.data_size % isz:
        raise MergeError(f"{inputs[-1].path}: item {item.index.fqn}: storage size not a multiple "
                         f"of {item.in_dtype}")
    for j, blob in enumerate(blobs):
        if blob is None:
            continue
        if blob.pickle != newest.pickle or blob.data_size != newest.data_size:
            raise MergeError(
                f"{item.index.fqn}: saved with a different tensor layout in {inputs[j].path} "
                f"than in {inputs[-1].path}"
            )
    item.numel = newest.data_size // isz
    item.data_crcs = [
        None if (blob is None or item.sources[j] is None) else blob.storage_record.crc
        for j, blob in enumerate(blobs)
    ]
    item.data_offsets = [
        None if (blob is None or item.sources[j] is None) else item.sources[j][1] + blob.data_offset
        for j, blob in enumerate(blobs)
    ]
    if item.out_dtype == item.in_dtype:
        item.template = newest.template(newest_reader)
    else:
        item.template = _retyped_template(item, newest, newest_reader, inputs[-1].path)
    return item


def _check_small_records(
    blob: fmt.TensorBlob, reader: fmt.BlobReader, inp: Path, path: str, fqn: str
) -> None:
    """CRC-32 of the blob's records other than the storage (``data.pkl``, ``byteorder``…):
    small, and copied into the output's template, so checked here rather than streamed."""
    for record in blob.records:
        if record is blob.storage_record:
            continue
        if zlib.crc32(reader.read(record.data_offset, record.size)) != record.crc:
            raise MergeError(crc_mismatch(inp, path, fqn, record.name))


def crc_mismatch(inp: Path | str, path: str, fqn: str, record: str) -> str:
    """The one-line error for data whose CRC-32 differs from the one its zip record stores."""
    return (
        f"{inp}: CRC-32 mismatch in {os.path.basename(path)} item {fqn} (record {record}): "
        "the bytes changed after they were saved (bit rot or tampering); refusing to merge"
    )


def _retyped_template(
    item: Item, blob: fmt.TensorBlob, reader: fmt.BlobReader, path: Path
) -> fmt.BlobTemplate:
    assert item.in_dtype is not None and item.out_dtype is not None
    try:
        pickled = fmt.retype_tensor_pickle(blob.pickle, item.in_dtype, item.out_dtype)
    except fmt.FormatError as e:
        raise MergeError(f"{path}: item {item.index.fqn}: {e}") from e
    records: list[tuple[str, bytes | int]] = []
    for record in blob.records:
        if record is blob.storage_record:
            records.append((record.name, item.numel * item.out_dtype.itemsize))
        elif record.name.endswith("data.pkl"):
            records.append((record.name, pickled))
        else:
            records.append((record.name, reader.read(record.data_offset, record.size)))
    return fmt.build_tensor_blob(records)


def layout_output(items: list[Item]) -> dict[str, int]:
    """Assign output offsets (same files and order as the newest input); returns file sizes."""
    sizes: dict[str, int] = {}
    for item in items:
        offset = sizes.get(item.out_file, 0)
        item.out_offset = offset
        item.out_length = item.template.length if item.template is not None else item.newest[2]
        sizes[item.out_file] = offset + item.out_length
    return sizes


def build_plan(
    inputs: list[CheckpointInput],
    coefficients: list[float],
    output_dtype: str,
    comm: Comm,
    *,
    verify_crc: bool = True,
) -> Plan:
    """Validate the inputs and compute the output layout, collectively (nothing is written).

    With ``verify_crc`` every byte the merge takes from an input is checked against the CRC-32
    its zip record stores: copied items here, averaged items while they are streamed.
    """

    def skeleton() -> tuple[Any, list[Item], dict[str, str], Any, list[str]]:
        metas = _load_metadata(inputs)
        actions = check_metadata(inputs, metas)
        items = _skeleton_items(inputs, metas, coefficients, actions, output_dtype)
        common, notes = load_common(inputs[-1].path)
        return metas[-1], items, actions, common, notes

    metadata, items, actions, common, notes = comm.run_on_rank0(skeleton)

    def inspect_share() -> dict[int, Item]:
        mine = [(i, item) for i, item in enumerate(items) if i % comm.size == comm.rank]
        if verify_crc:
            for _, item in mine:
                if item.action == ACTION_COPY:
                    _check_copied_crc(item, inputs[-1].path)
        return {i: inspect_item(item, inputs) for i, item in mine if item.action == ACTION_AVERAGE}

    for share in comm.run_everywhere(inspect_share):
        for i, item in share.items():
            items[i] = item
    layout_output(items)
    if any(c == 0.0 for c in coefficients):
        skipped = [str(inp.path) for inp, c in zip(inputs, coefficients) if c == 0.0]
        notes.append(
            f"coefficient 0 for {len(skipped)} input(s): their metadata and files were checked, "
            "their tensors were not read (nor checked for NaN/Inf or CRC-32)"
        )
    if not verify_crc:
        notes.append("CRC-32 of the input data NOT checked (verify_crc=False)")
    return Plan(
        inputs, coefficients, metadata, items, actions, output_dtype, notes,
        verify_crc=verify_crc, common=common,
    )


def _check_copied_crc(item: Item, inp: Path) -> None:
    """CRC-32 of a copied item's records (the newest input's bytes go out verbatim)."""
    path, offset, length = item.newest
    try:
        with open(path, "rb") as f:

            def read_at(pos: int, size: int) -> bytes:
                return os.pread(f.fileno(), size, offset + pos)

            problems = ckpt_integrity.blob_crc_problems(read_at, length, "")
    except FileNotFoundError as e:
        raise MergeError(gone_message(inp)) from e
    if problems:
        raise MergeError(
            f"{inp}: {os.path.basename(path)} item {item.index.fqn}{problems[0]}; refusing to "
            "merge"
        )


#: Entries of ``common.pt`` that are optimizer or RNG state (never copied into a merged model).
COMMON_DROPPED = ("optimizer", "rng_state")


def load_common(newest: Path) -> tuple[Any, list[str]]:
    """The newest input's ``common.pt`` (``weights_only``) minus optimizer/RNG, with notes.

    A ``common.pt`` that does not load with ``weights_only`` is refused rather than copied
    byte for byte: the merged checkpoint would carry an unverified pickle under our manifest.
    """
    import argparse

    common = newest / "common.pt"
    if not common.is_file():
        return None, []
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(common, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unsafe or corrupt pickles
        raise MergeError(
            f"{common}: not loadable with weights_only ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); refusing to copy an unverified pickle"
        ) from e
    notes = []
    if isinstance(state, dict):
        removed = [k for k in COMMON_DROPPED if k in state]
        if removed:
            state = {k: v for k, v in state.items() if k not in COMMON_DROPPED}
            notes.append(f"{', '.join(removed)} entries removed from common.pt")
    return state, notes


# ----------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Piece:
    """A unit of streaming work: elements [start, start+count) of an averaged item, or bytes
    [start, start+count) of a copied one."""

    item: int
    start: int
    count: int
    cost: int


@dataclasses.dataclass(frozen=True)
class Buffers:
    """Sizes of one rank's streaming buffers (see :class:`Streamer`)."""

    elems: int  #: elements per piece
    inputs: int  #: inputs read per piece (non-zero coefficients)
    in_itemsize: int  #: widest input dtype
    out_itemsize: int  #: widest output dtype

    @property
    def group_bytes(self) -> int:
        """One read group: the piece's slice of every input."""
        return self.inputs * self.elems * self.in_itemsize

    @property
    def copy_bytes(self) -> int:
        """Largest byte range of a copied item per piece (it goes in one read buffer)."""
        return self.elems * self.in_itemsize

    @property
    def total(self) -> int:
        """Bytes of all buffers: read groups, output buffers, the block scratch."""
        return (
            GROUP_DEPTH * self.group_bytes
            + OUT_DEPTH * self.elems * self.out_itemsize
            + 2 * BLOCK * 4
        )


#: Read groups in flight: one being accumulated, one being filled by the reader thread.
GROUP_DEPTH = 2
#: Output buffers: one being filled by the accumulation, one being written by the writer.
OUT_DEPTH = 2
#: Elements accumulated at a time: fp32 accumulator + conversion buffer stay in L2 cache
#: across all inputs, so memory traffic is one read per input byte (2x faster on CPU than
#: accumulating whole pieces).
BLOCK = 1 << 17


def plan_buffers(plan: Plan, chunk_bytes: int) -> Buffers:
    """Elements per piece such that all streaming buffers together fit in ``chunk_bytes``.

    Per element of a piece: ``GROUP_DEPTH x inputs x input itemsize`` (the piece's slice of
    every input, double-buffered) + ``OUT_DEPTH x output itemsize``. More inputs give smaller
    pieces, never more memory.
    """
    averaged = [it for it in plan.items if it.action == ACTION_AVERAGE]
    widest_in = max([1] + [it.in_dtype.itemsize for it in averaged if it.in_dtype is not None])
    widest_out = max([1] + [it.out_dtype.itemsize for it in averaged if it.out_dtype is not None])
    inputs = max(1, sum(c != 0.0 for c in plan.coefficients))
    per_elem = GROUP_DEPTH * inputs * widest_in + OUT_DEPTH * widest_out
    budget = max(0, chunk_bytes - 2 * BLOCK * 4)
    elems = max(1024, (budget // per_elem) // 64 * 64)
    return Buffers(elems, inputs, widest_in, widest_out)


def piece_elements(plan: Plan, chunk_bytes: int) -> int:
    """Elements per piece for a streaming-buffer budget of ``chunk_bytes`` (see plan_buffers)."""
    return plan_buffers(plan, chunk_bytes).elems


def make_pieces(plan: Plan, buffers: Buffers) -> list[Piece]:
    """Every piece of the merge, in output order."""
    pieces = []
    elems, n_read = buffers.elems, buffers.inputs
    for i, item in enumerate(plan.items):
        if item.action == ACTION_AVERAGE:
            assert item.in_dtype is not None and item.out_dtype is not None
            per = item.in_dtype.itemsize * n_read + item.out_dtype.itemsize
            for start in range(0, item.numel, elems):
                count = min(elems, item.numel - start)
                pieces.append(Piece(i, start, count, count * per))
        else:
            length, step = item.newest[2], buffers.copy_bytes
            for start in range(0, max(length, 1), step):
                count = min(step, length - start)
                pieces.append(Piece(i, start, count, 2 * count + 4096))
    return pieces


def split_pieces(pieces: list[Piece], ranks: int) -> list[list[Piece]]:
    """Contiguous runs of pieces of (nearly) equal total cost, one per rank."""
    total = sum(p.cost for p in pieces)
    runs: list[list[Piece]] = [[] for _ in range(ranks)]
    done = 0
    for piece in pieces:
        # Assign by the cost midpoint so a big piece lands on the rank owning most of it.
        rank = min(ranks - 1, int((done + piece.cost / 2) * ranks // max(total, 1)))
        runs[rank].append(piece)
        done += piece.cost
    return runs


# ----------------------------------------------------------------------------- streaming


class _Files:
    """Cached file descriptors (inputs read-only, outputs write-only)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int], int] = {}

    def fd(self, path: str, flags: int = os.O_RDONLY) -> int:
        key = (path, flags)
        if key not in self._fds:
            self._fds[key] = os.open(path, flags)
        return self._fds[key]

    def sync_outputs(self) -> None:
        for (path, flags), fd in self._fds.items():
            if flags != os.O_RDONLY:
                try:
                    os.fsync(fd)
                except OSError as e:  # ENOSPC/EIO may only surface here
                    raise MergeError(write_failed(path, e)) from e

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise MergeError(f"{what}: unexpected end of file (truncated shard)")
        done += n


def write_failed(path: str | Path, error: OSError) -> str:
    """The one-line error for a failed write of the output (names the file: ENOSPC, EIO…)."""
    return f"writing the merged checkpoint failed at {path}: {error.strerror or error}"


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while len(view):
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as e:
        raise MergeError(write_failed(path, e)) from e


class _Buffer:
    """A reusable byte buffer with a uint8 tensor view and a memoryview of the same memory.

    Allocated with ``torch.empty`` rather than ``bytearray`` so that creating the pools costs no
    zero-filling pass (pages are touched when first used).
    """

    def __init__(self, nbytes: int) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.view = memoryview(self.tensor.numpy()) if nbytes else memoryview(b"")

    def typed(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return self.tensor[: numel * dtype.itemsize].view(dtype)


class _Pool:
    """Free buffers; ``get`` waits for one, or raises once the stream is stopping."""

    def __init__(self, buffers: list[_Buffer], stop: threading.Event) -> None:
        self._free: queue.Queue[_Buffer] = queue.Queue()
        for buf in buffers:
            self._free.put(buf)
        self._stop = stop

    def get(self) -> _Buffer:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped() from None

    def put(self, buf: _Buffer) -> None:
        self._free.put(buf)


class _Stopped(Exception):
    """A pipeline stage was told to stop because another one failed."""


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped() from None


class _Group:
    """One read buffer per input of a piece."""

    def __init__(self, inputs: int, nbytes: int) -> None:
        self.bufs = [_Buffer(nbytes) for _ in range(inputs)]


class Streamer:
    """One rank's streaming engine: a reader thread, the accumulating (calling) thread and a
    writer thread, connected by queues and fixed buffer pools.

    The reader ``preadv``-s a piece's slice of every input into a free read group; the
    accumulator sums them block by block in fp32 (cache-resident) and casts into a free output
    buffer; the writer computes the CRC-32 and ``pwrite``-s it. Consecutive pieces overlap (the
    syscalls and zlib release the GIL). Memory is the pools' fixed size (:class:`Buffers`),
    whatever the model size or the number of inputs.
    """

    def __init__(self, plan: Plan, out_dir: Path, buffers: Buffers) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.sizes = buffers
        self.stop = threading.Event()
        groups = [_Group(buffers.inputs, buffers.copy_bytes) for _ in range(GROUP_DEPTH)]
        self.group_pool = _Pool(groups, self.stop)
        out_bytes = buffers.elems * buffers.out_itemsize
        self.out_pool = _Pool([_Buffer(out_bytes) for _ in range(OUT_DEPTH)], self.stop)
        self.block_acc = torch.empty(BLOCK, dtype=_FP32)
        self.block_tmp = torch.empty(BLOCK, dtype=_FP32)
        self.buffer_bytes = buffers.total
        self.read_files = _Files()
        self.write_files = _Files()
        # CRC of each item's storage bytes written by this rank: item -> [start, crc, length].
        self.crc_runs: dict[int, list[int]] = {}
        # CRC of the storage bytes read from each input: (item, input) -> [start, crc, length].
        self.in_crc_runs: dict[tuple[int, int], list[int]] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self._ready: queue.Queue = queue.Queue(maxsize=GROUP_DEPTH)
        self._writes: queue.Queue = queue.Queue(maxsize=OUT_DEPTH + 1)
        self._errors: list[BaseException] = []

    def used_inputs(self, item: Item) -> list[int]:
        """Inputs read for an averaged item (non-zero coefficient)."""
        return [
            j
            for j, off in enumerate(item.data_offsets)
            if off is not None and self.plan.coefficients[j] != 0.0
        ]

    # -- stages

    def run(self, pieces: list[Piece], progress: Callable[[int], None] | None = None) -> None:
        """Stream ``pieces`` (this rank's share) into the output files."""
        reader = threading.Thread(target=self._guard, args=(self._read_all, pieces), daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write_all, progress),
                                  daemon=True)
        reader.start()
        writer.start()
        threads = torch.get_num_threads()
        # The reader and writer threads need cores too: torch's spinning OpenMP workers on
        # every core would starve them (measured 2.5x slower on 2 cores).
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 2)))
        try:
            self._compute_all()
            self._writes.put(None)
        except BaseException as e:
            self._errors.append(e)
        finally:
            torch.set_num_threads(threads)
            if self._errors:
                self.stop.set()
            reader.join()
            writer.join()
            self.read_files.close()
            self.write_files.close()
        errors = [e for e in self._errors if not isinstance(e, _Stopped)]
        if errors:
            raise errors[0]

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # reported by run() on the calling thread
            self._errors.append(e)
            self.stop.set()

    def _read_all(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            item = self.plan.items[piece.item]
            group = self.group_pool.get()
            if item.action == ACTION_AVERAGE:
                assert item.in_dtype is not None
                isz = item.in_dtype.itemsize
                for buf, j in zip(group.bufs, self.used_inputs(item)):
                    src, data_offset = item.sources[j], item.data_offsets[j]
                    assert src is not None and data_offset is not None
                    offset = data_offset + piece.start * isz
                    view = buf.view[: piece.count * isz]
                    self._pread(src[0], view, offset)
                    if self.plan.verify_crc:
                        # This rank's pieces of an item are contiguous and in order: one run.
                        key = (piece.item, j)
                        run = self.in_crc_runs.setdefault(key, [piece.start * isz, 0, 0])
                        run[1] = zlib.crc32(view, run[1])
                        run[2] += len(view)
            else:
                path, offset, _ = item.newest
                self._pread(path, group.bufs[0].view[: piece.count], offset + piece.start)
            self._put(self._ready, (piece, group))
        self._put(self._ready, None)

    def _pread(self, path: str, view: memoryview, offset: int) -> None:
        try:
            fd = self.read_files.fd(path)
        except FileNotFoundError as e:
            inp = next((i.path for i in self.plan.inputs if path.startswith(f"{i.path}/")), path)
            raise MergeError(gone_message(inp)) from e
        _pread_exact(fd, view, offset, path)
        self.bytes_read += len(view)

    def _put(self, q: queue.Queue, msg: Any) -> None:
        while True:
            try:
                q.put(msg, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set():
                    raise _Stopped() from None

    def _compute_all(self) -> None:
        while (msg := _get(self._ready, self.stop)) is not None:
            piece, group = msg
            item = self.plan.items[piece.item]
            if item.action != ACTION_AVERAGE:  # a copied item: straight to the writer
                view = group.bufs[0].view[: piece.count]
                self._put(self._writes, (piece, item, view, self.group_pool, group))
                continue
            assert item.out_dtype is not None
            out = self.out_pool.get()
            self._accumulate(piece, item, group, out)
            self.group_pool.put(group)
            view = out.view[: piece.count * item.out_dtype.itemsize]
            self._put(self._writes, (piece, item, view, self.out_pool, out))

    def _write_all(self, progress: Callable[[int], None] | None) -> None:
        # Pieces come in file order: once the writer moves on, a file is flushed to disk by a
        # syncer thread while writing, reading and accumulating go on.
        to_sync: queue.Queue = queue.Queue()
        syncer = threading.Thread(target=self._guard, args=(self._sync_all, to_sync), daemon=True)
        syncer.start()
        try:
            self._write_pieces(progress, to_sync)
        finally:
            to_sync.put(None)
            syncer.join()
        self.write_files.sync_outputs()

    def _sync_all(self, to_sync: queue.Queue) -> None:
        while (msg := to_sync.get()) is not None:
            fd, path = msg
            try:
                os.fsync(fd)
            except OSError as e:
                raise MergeError(write_failed(path, e)) from e

    def _write_pieces(self, progress: Callable[[int], None] | None, to_sync: queue.Queue) -> None:
        current = None
        while (msg := _get(self._writes, self.stop)) is not None:
            piece, item, view, pool, buf = msg
            path = str(self.out_dir / item.out_file)
            fd = self.write_files.fd(path, os.O_WRONLY)
            if current is not None and fd != current[0]:
                to_sync.put(current)
            current = (fd, path)
            if item.action == ACTION_AVERAGE:
                assert item.out_dtype is not None
                start = piece.start * item.out_dtype.itemsize
                run = self.crc_runs.setdefault(piece.item, [start, 0, 0])
                run[1] = zlib.crc32(view, run[1])
                run[2] += len(view)
                _pwrite_all(fd, view, item.data_start + start, path)
            else:
                _pwrite_all(fd, view, item.out_offset + piece.start, path)
            self.bytes_written += len(view)
            pool.put(buf)
            if progress is not None:
                progress(piece.cost)
            if self.delay:
                time.sleep(self.delay)

    # -- arithmetic

    def _accumulate(self, piece: Piece, item: Item, group: _Group, out: _Buffer) -> None:
        """out = cast(Σ_j c_j · x_j) over the piece, BLOCK elements at a time, in fp32."""
        assert item.in_dtype is not None and item.out_dtype is not None
        n = piece.count
        terms = [
            (buf.typed(item.in_dtype, n), self.plan.coefficients[j])
            for buf, j in zip(group.bufs, self.used_inputs(item))
        ]
        result = out.typed(item.out_dtype, n)
        convert = item.in_dtype != _FP32
        finite = True
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            acc = self.block_acc[:m]
            for k, (x, coef) in enumerate(terms):
                v = x[start : start + m]
                if convert:
                    # Mixed-dtype add_ (bf16 into fp32) is several times slower on CPU than an
                    # explicit conversion into an fp32 buffer followed by a same-dtype add_.
                    v = self.block_tmp[:m].copy_(v)
                if k == 0:
                    torch.mul(v, coef, out=acc)
                else:
                    acc.add_(v, alpha=coef)
            # A NaN/Inf in any input read makes the block's sum non-finite (cheap to test).
            finite = finite and math.isfinite(float(acc.sum()))
            result[start : start + m].copy_(acc)
        if not finite:
            self._raise_non_finite(piece, item)

    def _raise_non_finite(self, piece: Piece, item: Item) -> None:
        assert item.in_dtype is not None
        isz = item.in_dtype.itemsize
        files = _Files()
        try:
            for j in self.used_inputs(item):
                src, data_offset = item.sources[j], item.data_offsets[j]
                assert src is not None and data_offset is not None
                raw = bytearray(piece.count * isz)
                _pread_exact(files.fd(src[0]), memoryview(raw), data_offset + piece.start * isz,
                             src[0])
                x = torch.frombuffer(raw, dtype=item.in_dtype)
                if not bool(torch.isfinite(x).all()):
                    raise MergeError(
                        f"{self.plan.inputs[j].path}: NaN/Inf in {item.index.fqn} (elements "
                        f"{piece.start}..{piece.start + piece.count} of the item); refusing "
                        "to merge"
                    )
        finally:
            files.close()
        raise MergeError(f"{item.index.fqn}: the merged values overflow (NaN/Inf)")


# ----------------------------------------------------------------------------- finishing


def combine_crcs(plan: Plan, runs_per_rank: list[dict[int, list[int]]]) -> dict[int, int]:
    """CRC-32 of each averaged item's storage bytes from the ranks' partial runs."""
    runs: dict[int, list[list[int]]] = {}
    for per_rank in runs_per_rank:
        for item, run in per_rank.items():
            runs.setdefault(item, []).append(run)
    crcs = {}
    for i, item in enumerate(plan.items):
        if item.action != ACTION_AVERAGE:
            continue
        parts = sorted(runs.get(i, []))
        crc, covered = 0, 0
        for start, part_crc, length in parts:
            if start != covered:
                raise MergeError(f"internal error: {item.index.fqn} not fully written")
            crc = fmt.crc32_combine(crc, part_crc, length) if covered else part_crc
            covered += length
        assert item.template is not None
        if covered != item.template.data_size:
            raise MergeError(f"internal error: {item.index.fqn} not fully written")
        crcs[i] = crc
    return crcs


def _combine_runs(parts: list[list[int]]) -> tuple[int, int] | None:
    """(CRC, length) of contiguous runs [start, crc, length] from offset 0; None on a gap."""
    crc, covered = 0, 0
    for start, part_crc, length in sorted(parts):
        if start != covered:
            return None
        crc = fmt.crc32_combine(crc, part_crc, length) if covered else part_crc
        covered += length
    return crc, covered


def check_input_crcs(
    plan: Plan, runs_per_rank: list[dict[tuple[int, int], list[int]]]
) -> None:
    """Compare the CRC-32 of the storage bytes streamed from every input with the CRC its zip
    record stores; MergeError naming the input, file and item at the first mismatch."""
    runs: dict[tuple[int, int], list[list[int]]] = {}
    for per_rank in runs_per_rank:
        for key, run in per_rank.items():
            runs.setdefault(key, []).append(run)
    for i, item in enumerate(plan.items):
        if item.action != ACTION_AVERAGE:
            continue
        for j, expected in enumerate(item.data_crcs):
            if expected is None:
                continue
            src = item.sources[j]
            assert src is not None
            combined = _combine_runs(runs.get((i, j), []))
            size = item.numel * (item.in_dtype.itemsize if item.in_dtype is not None else 1)
            if combined is None or combined[1] != size:
                raise MergeError(f"internal error: {item.index.fqn} of {src[0]} not fully read")
            if combined[0] != expected:
                raise MergeError(
                    crc_mismatch(plan.inputs[j].path, src[0], item.index.fqn, "data")
                )


def write_item_frames(plan: Plan, out_dir: Path, crcs: dict[int, int]) -> None:
    """Write the zip headers/trailers of every averaged item (rank 0, after streaming)."""
    files = _Files()
    try:
        for i, item in enumerate(plan.items):
            if item.action != ACTION_AVERAGE:
                continue
            assert item.template is not None
            prefix, suffix = item.template.render(crcs[i])
            path = str(out_dir / item.out_file)
            fd = files.fd(path, os.O_WRONLY)
            _pwrite_all(fd, prefix, item.out_offset, path)
            _pwrite_all(fd, suffix, item.data_start + item.template.data_size, path)
        files.sync_outputs()
    finally:
        files.close()


def create_output_files(plan: Plan, out_dir: Path) -> None:
    """Create every output ``.distcp`` file at its final size (sparse until written)."""
    for name, size in layout_sizes(plan).items():
        with open(out_dir / name, "wb") as f:
            f.truncate(size)


def layout_sizes(plan: Plan) -> dict[str, int]:
    """Final size of every output file."""
    sizes: dict[str, int] = {}
    for item in plan.items:
        sizes[item.out_file] = max(sizes.get(item.out_file, 0), item.out_offset + item.out_length)
    return sizes


def merged_metadata(plan: Plan, out_dir: Path) -> Any:
    """The output's DCP Metadata: the newest input's, minus dropped keys, with new storage."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = copy.copy(plan.metadata)
    state = {}
    for key, value in plan.metadata.state_dict_metadata.items():
        action = plan.actions[key]
        if action == ACTION_DROP:
            continue
        if action == ACTION_AVERAGE and isinstance(value, TensorStorageMetadata):
            dtype = _out_dtype(value.properties.dtype, plan.output_dtype)
            if dtype != value.properties.dtype:
                props = dataclasses.replace(value.properties, dtype=dtype)
                value = TensorStorageMetadata(props, value.size, value.chunks)
        state[key] = value
    md.state_dict_metadata = state
    md.storage_data = {
        item.index: fmt.make_storage_info(item.out_file, item.out_offset, item.out_length)
        for item in plan.items
    }
    if isinstance(getattr(md, "planner_data", None), dict):
        md.planner_data = {k: v for k, v in md.planner_data.items() if k in state}
    if getattr(md, "storage_meta", None) is not None:
        md.storage_meta = dataclasses.replace(
            md.storage_meta, checkpoint_id=str(out_dir), save_id=str(uuid.uuid4()), load_id=None
        )
    # megatron-core stores its save plans here to reuse them on the next save; they name the
    # dropped optimizer items, so drop them (megatron then simply plans afresh).
    md.__dict__.pop("all_local_plans", None)
    return md


def write_common(plan: Plan, out_dir: Path) -> None:
    """Write ``metadata.json`` and the planned ``common.pt`` (optimizer/RNG entries removed)."""
    newest = plan.inputs[-1].path
    if (newest / "metadata.json").is_file():
        shutil.copyfile(newest / "metadata.json", out_dir / "metadata.json")
    if plan.common is not None:
        torch.save(plan.common, out_dir / "common.pt")


def stream(
    plan: Plan,
    out_dir: Path,
    comm: Comm,
    chunk_bytes: int,
    progress: bool,
) -> tuple[int, int, int, list[str]]:
    """Create, fill and finish the output's data files and ``.metadata`` (collective).

    Returns (bytes read, bytes written, buffer bytes per rank, notes) summed over ranks.
    """
    comm.run_on_rank0(lambda: _naming_output(create_output_files, plan, out_dir))
    buffers = plan_buffers(plan, chunk_bytes)
    share = split_pieces(make_pieces(plan, buffers), comm.size)[comm.rank]

    def work() -> tuple[dict[int, list[int]], int, int, int, dict[tuple[int, int], list[int]]]:
        streamer = Streamer(plan, out_dir, buffers)
        with _progress_bar(share, enabled=progress and comm.rank == 0) as update:
            streamer.run(share, update)
        return (streamer.crc_runs, streamer.bytes_read, streamer.bytes_written,
                streamer.buffer_bytes, streamer.in_crc_runs)

    results = comm.run_everywhere(work)

    def finish() -> None:
        if plan.verify_crc:
            check_input_crcs(plan, [r[4] for r in results])
        crcs = combine_crcs(plan, [r[0] for r in results])
        write_item_frames(plan, out_dir, crcs)
        fmt.write_metadata(str(out_dir / fmt.METADATA_FILE), merged_metadata(plan, out_dir))
        write_common(plan, out_dir)

    comm.run_on_rank0(lambda: _naming_output(lambda _p, _d: finish(), plan, out_dir))
    notes: list[str] = []
    frame_bytes = sum(
        len(it.template.prefix) + len(it.template.suffix)
        for it in plan.items
        if it.template is not None
    )
    read = sum(r[1] for r in results)
    written = sum(r[2] for r in results) + frame_bytes
    return read, written, max(r[3] for r in results), notes


def _naming_output(fn: Callable[[Plan, Path], Any], plan: Plan, out_dir: Path) -> Any:
    """``fn(plan, out_dir)`` with OSErrors (ENOSPC…) turned into errors naming the file."""
    try:
        return fn(plan, out_dir)
    except OSError as e:
        raise MergeError(write_failed(e.filename or out_dir, e)) from e


class _progress_bar:
    """tqdm over this rank's bytes, or a no-op."""

    def __init__(self, pieces: list[Piece], enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            total = sum(p.cost for p in pieces)
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge (rank 0)")

    def __enter__(self) -> Callable[[int], None] | None:
        return self.bar.update if self.bar is not None else None

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
