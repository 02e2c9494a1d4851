"""Streaming a torch_dist merge: pieces of work, buffer sizes, one rank's threaded engine.

A piece is at most one chunk of elements of an averaged item, or a byte range of a copied one;
:func:`split_pieces` gives each merge rank a contiguous run of equal cost and :class:`Streamer`
reads, accumulates (fp32) and writes that run with fixed-size buffers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.merge.common import MergeError
from megatron_wsm.merge.torch_dist.plan import (
    _FP32,
    ACTION_AVERAGE,
    DELAY_ENV,
    Item,
    Plan,
    gone_message,
)

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
            if flags == os.O_RDONLY:  # an input shard: a regular file, not followed or blocked on
                try:
                    with ckpt_integrity.open_regular(path) as f:
                        self._fds[key] = os.dup(f.fileno())
                except ckpt_integrity.IntegrityError as e:  # replaced since it was checked
                    raise MergeError(str(e)) from e
            else:
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
