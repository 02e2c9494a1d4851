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
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.merge import dcp_format as fmt
from megatron_wsm.merge.common import Comm, MergeError
from megatron_wsm.merge.inputs import CheckpointInput

#: Keys of the optimizer in megatron-core's sharded state dict; dropped by the merge.
DROPPED_PREFIXES = ("optimizer.",)
#: Environment hook for tests: sleep this many seconds after each piece (to kill mid-merge).
DELAY_ENV = "MEGATRON_WSM_MERGE_TEST_DELAY"

ACTION_AVERAGE = "average"
ACTION_COPY = "copy"
ACTION_DROP = "drop"

_FP32 = torch.float32


def classify(fqn: str, storage_md: Any) -> str:
    """What the merge does with one key: average float tensors, copy the rest, drop optimizer."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if fqn.startswith(DROPPED_PREFIXES):
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
    metas = []
    for inp in inputs:
        try:
            metas.append(fmt.read_metadata(str(inp.path)))
        except FileNotFoundError as e:
            raise MergeError(f"{inp.path}: missing .metadata: incomplete checkpoint") from e
        except Exception as e:  # an unreadable pickle is corruption, whatever torch raises
            raise MergeError(f"{inp.path}: unreadable .metadata ({type(e).__name__}: {e})") from e
    return metas


def check_metadata(inputs: list[CheckpointInput], metas: list[Any]) -> dict[str, str]:
    """Refuse inputs whose tensors differ in keys, shapes, dtypes or sharding; return actions."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ref, ref_path = metas[-1], inputs[-1].path
    actions = {k: classify(k, v) for k, v in ref.state_dict_metadata.items()}

    def tensors(md: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in md.state_dict_metadata.items()
            if not k.startswith(DROPPED_PREFIXES) and not isinstance(v, BytesStorageMetadata)
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
            rel, offset, length = fmt.storage_location(info)
        except fmt.FormatError as e:
            raise MergeError(f"{inp.path}: {index.fqn}: {e}") from e
        path = str(inp.path / rel)
        if path not in sizes:
            try:
                sizes[path] = os.stat(path).st_size
            except FileNotFoundError as e:
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
            blobs.append(fmt.describe_tensor_blob(reader))
        except fmt.FormatError as e:
            raise MergeError(f"{inputs[j].path}: item {item.index.fqn}: {e}") from e
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
    item.data_offsets = [
        None if (blob is None or item.sources[j] is None) else item.sources[j][1] + blob.data_offset
        for j, blob in enumerate(blobs)
    ]
    if item.out_dtype == item.in_dtype:
        item.template = newest.template(newest_reader)
    else:
        item.template = _retyped_template(item, newest, newest_reader, inputs[-1].path)
    return item


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
) -> Plan:
    """Validate the inputs and compute the output layout, collectively (nothing is written)."""

    def skeleton() -> tuple[Any, list[Item], dict[str, str]]:
        metas = _load_metadata(inputs)
        actions = check_metadata(inputs, metas)
        items = _skeleton_items(inputs, metas, coefficients, actions, output_dtype)
        return metas[-1], items, actions

    metadata, items, actions = comm.run_on_rank0(skeleton)

    def inspect_share() -> dict[int, Item]:
        return {
            i: inspect_item(item, inputs)
            for i, item in enumerate(items)
            if i % comm.size == comm.rank and item.action == ACTION_AVERAGE
        }

    for share in comm.run_everywhere(inspect_share):
        for i, item in share.items():
            items[i] = item
    layout_output(items)
    notes = []
    if any(c == 0.0 for c in coefficients):
        skipped = [str(inp.path) for inp, c in zip(inputs, coefficients) if c == 0.0]
        notes.append(
            f"coefficient 0 for {len(skipped)} input(s): their metadata and files were checked, "
            "their tensors were not read (nor checked for NaN/Inf)"
        )
    return Plan(inputs, coefficients, metadata, items, actions, output_dtype, notes)


# ----------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Piece:
    """A unit of streaming work: elements [start, start+count) of an averaged item, or bytes
    [start, start+count) of a copied one."""

    item: int
    start: int
    count: int
    cost: int


def piece_elements(plan: Plan, chunk_bytes: int) -> int:
    """Elements per piece so that all streaming buffers together fit in ``chunk_bytes``.

    Per element: the input read buffer (input itemsize), the fp32 accumulator (4 bytes) and,
    for non-fp32 inputs, an fp32 conversion buffer (4 bytes). The output is written from the
    accumulator or from the read buffer, never from a buffer of its own.
    """
    per_elem = 4
    widest = 4
    for item in plan.items:
        if item.action == ACTION_AVERAGE:
            assert item.in_dtype is not None
            widest = max(widest, item.in_dtype.itemsize)
            if item.in_dtype != _FP32:
                per_elem = 8
    per_elem += widest
    return max(1024, (chunk_bytes // per_elem) // 64 * 64)


def make_pieces(plan: Plan, elems: int) -> list[Piece]:
    """Every piece of the merge, in output order."""
    pieces = []
    n_read = sum(c != 0.0 for c in plan.coefficients)
    for i, item in enumerate(plan.items):
        if item.action == ACTION_AVERAGE:
            assert item.in_dtype is not None and item.out_dtype is not None
            per = item.in_dtype.itemsize * n_read + item.out_dtype.itemsize
            for start in range(0, item.numel, elems):
                count = min(elems, item.numel - start)
                pieces.append(Piece(i, start, count, count * per))
        else:
            length = item.newest[2]
            step = elems * 4
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
        for (_, flags), fd in self._fds.items():
            if flags != os.O_RDONLY:
                os.fsync(fd)

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


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Streamer:
    """One rank's streaming engine: fixed buffers, reused for every piece."""

    def __init__(self, plan: Plan, out_dir: Path, elems: int) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.elems = elems
        widest = max(
            [4] + [it.in_dtype.itemsize for it in plan.items if it.in_dtype is not None]
        )
        needs_tmp = any(
            it.in_dtype is not None and it.in_dtype != _FP32 for it in plan.items
        )
        # bytearrays + torch.frombuffer: tensors for arithmetic, memoryviews for syscalls.
        self._in = bytearray(elems * widest)
        self._acc = bytearray(elems * 4)
        self._tmp = bytearray(elems * 4) if needs_tmp else bytearray(0)
        self.buffer_bytes = len(self._in) + len(self._acc) + len(self._tmp)
        self.in_t = torch.frombuffer(self._in, dtype=torch.uint8)
        self.acc_t = torch.frombuffer(self._acc, dtype=_FP32)
        self.tmp_t = torch.frombuffer(self._tmp, dtype=_FP32) if needs_tmp else None
        self.files = _Files()
        # CRC of each item's storage bytes written by this rank: item -> [start, crc, length].
        self.crc_runs: dict[int, list[int]] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    def run(self, pieces: list[Piece], progress: Callable[[int], None] | None = None) -> None:
        """Stream ``pieces`` (this rank's share) into the output files."""
        try:
            for piece in pieces:
                item = self.plan.items[piece.item]
                if item.action == ACTION_AVERAGE:
                    self._average(piece, item)
                else:
                    self._copy(piece, item)
                if progress is not None:
                    progress(piece.cost)
                if self.delay:
                    time.sleep(self.delay)
            self.files.sync_outputs()
        finally:
            self.files.close()

    def _out_fd(self, item: Item) -> int:
        return self.files.fd(str(self.out_dir / item.out_file), os.O_WRONLY)

    def _copy(self, piece: Piece, item: Item) -> None:
        path, offset, _ = item.newest
        view = memoryview(self._in)[: piece.count]
        _pread_exact(self.files.fd(path), view, offset + piece.start, path)
        _pwrite_all(self._out_fd(item), view, item.out_offset + piece.start)
        self.bytes_read += piece.count
        self.bytes_written += piece.count

    def _average(self, piece: Piece, item: Item) -> None:
        assert item.in_dtype is not None and item.out_dtype is not None
        n, isz = piece.count, item.in_dtype.itemsize
        acc = self.acc_t[:n]
        first = True
        for j, coef in enumerate(self.plan.coefficients):
            data_offset = item.data_offsets[j] if j < len(item.data_offsets) else None
            if coef == 0.0 or data_offset is None:
                continue
            x = self._read(item, j, data_offset + piece.start * isz, n * isz)
            self._accumulate(acc, x, coef, first, item.in_dtype)
            first = False
        if not torch.isfinite(acc.sum()):
            self._raise_non_finite(piece, item)
        out = self._cast(acc, item.out_dtype)
        start_byte = piece.start * item.out_dtype.itemsize
        crc_run = self.crc_runs.setdefault(piece.item, [start_byte, 0, 0])
        crc_run[1] = zlib.crc32(out, crc_run[1])
        crc_run[2] += len(out)
        offset = item.data_start + piece.start * item.out_dtype.itemsize
        _pwrite_all(self._out_fd(item), out, offset)
        self.bytes_written += len(out)

    def _read(self, item: Item, j: int, offset: int, nbytes: int) -> torch.Tensor:
        src = item.sources[j]
        assert src is not None and item.in_dtype is not None
        _pread_exact(self.files.fd(src[0]), memoryview(self._in)[:nbytes], offset, src[0])
        self.bytes_read += nbytes
        return self.in_t[:nbytes].view(item.in_dtype)

    def _accumulate(
        self, acc: torch.Tensor, x: torch.Tensor, coef: float, first: bool, dtype: torch.dtype
    ) -> None:
        # Mixed-dtype add_ (bf16 into fp32) is several times slower on CPU than an explicit
        # conversion into an fp32 buffer followed by a same-dtype add_, hence the tmp buffer.
        if dtype != _FP32:
            assert self.tmp_t is not None
            x = self.tmp_t[: acc.numel()].copy_(x)
        if first:
            torch.mul(x, coef, out=acc)
        else:
            acc.add_(x, alpha=coef)

    def _cast(self, acc: torch.Tensor, dtype: torch.dtype) -> memoryview:
        if dtype == _FP32:
            return memoryview(self._acc)[: acc.numel() * 4]
        # The read buffer is free once every input is accumulated: the cast lands there.
        nbytes = acc.numel() * dtype.itemsize
        self.in_t[:nbytes].view(dtype).copy_(acc)
        return memoryview(self._in)[:nbytes]

    def _raise_non_finite(self, piece: Piece, item: Item) -> None:
        assert item.in_dtype is not None
        isz = item.in_dtype.itemsize
        for j, data_offset in enumerate(item.data_offsets):
            if data_offset is None or self.plan.coefficients[j] == 0.0:
                continue
            x = self._read(item, j, data_offset + piece.start * isz, piece.count * isz)
            if not bool(torch.isfinite(x).all()):
                raise MergeError(
                    f"{self.plan.inputs[j].path}: NaN/Inf in {item.index.fqn} (elements "
                    f"{piece.start}..{piece.start + piece.count} of the item); refusing to merge"
                )
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


def write_item_frames(plan: Plan, out_dir: Path, crcs: dict[int, int]) -> None:
    """Write the zip headers/trailers of every averaged item (rank 0, after streaming)."""
    files = _Files()
    try:
        for i, item in enumerate(plan.items):
            if item.action != ACTION_AVERAGE:
                continue
            assert item.template is not None
            prefix, suffix = item.template.render(crcs[i])
            fd = files.fd(str(out_dir / item.out_file), os.O_WRONLY)
            _pwrite_all(fd, prefix, item.out_offset)
            _pwrite_all(fd, suffix, item.data_start + item.template.data_size)
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


def write_common(plan: Plan, out_dir: Path) -> list[str]:
    """Copy ``metadata.json`` and ``common.pt`` from the newest input, without the optimizer's
    non-sharded part (its sharded part is dropped); returns notes."""
    newest = plan.inputs[-1].path
    notes = []
    if (newest / "metadata.json").is_file():
        shutil.copyfile(newest / "metadata.json", out_dir / "metadata.json")
    common = newest / "common.pt"
    if not common.is_file():
        return notes
    try:
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(common, map_location="cpu", weights_only=True)
    except Exception as e:  # not loadable without trusting pickles: keep it byte for byte
        shutil.copyfile(common, out_dir / "common.pt")
        why = type(e).__name__
        notes.append(f"common.pt copied verbatim (not loadable with weights_only: {why})")
        return notes
    if isinstance(state, dict) and "optimizer" in state:
        state = {k: v for k, v in state.items() if k != "optimizer"}
        notes.append("optimizer entries removed from common.pt")
    torch.save(state, out_dir / "common.pt")
    return notes


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
    comm.run_on_rank0(lambda: create_output_files(plan, out_dir))
    elems = piece_elements(plan, chunk_bytes)
    share = split_pieces(make_pieces(plan, elems), comm.size)[comm.rank]

    def work() -> tuple[dict[int, list[int]], int, int, int]:
        streamer = Streamer(plan, out_dir, elems)
        with _progress_bar(share, enabled=progress and comm.rank == 0) as update:
            streamer.run(share, update)
        return streamer.crc_runs, streamer.bytes_read, streamer.bytes_written, streamer.buffer_bytes

    results = comm.run_everywhere(work)

    def finish() -> list[str]:
        crcs = combine_crcs(plan, [r[0] for r in results])
        write_item_frames(plan, out_dir, crcs)
        fmt.write_metadata(str(out_dir / fmt.METADATA_FILE), merged_metadata(plan, out_dir))
        return write_common(plan, out_dir)

    notes = comm.run_on_rank0(finish)
    frame_bytes = sum(
        len(it.template.prefix) + len(it.template.suffix)
        for it in plan.items
        if it.template is not None
    )
    read = sum(r[1] for r in results)
    written = sum(r[2] for r in results) + frame_bytes
    return read, written, max(r[3] for r in results), notes


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


def iter_average_items(plan: Plan) -> Iterator[Item]:
    """The averaged items (for reports)."""
    return (it for it in plan.items if it.action == ACTION_AVERAGE)
