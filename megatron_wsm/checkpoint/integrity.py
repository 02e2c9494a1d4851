"""Is a torch_dist checkpoint directory what its ``.metadata`` says it is? (no process groups)

One owner for the checks every tool runs before trusting a checkpoint's files:

- :func:`load_metadata` reads ``.metadata`` with an unpickler that only builds the
  ``torch.distributed.checkpoint`` metadata types (and ``torch.Size`` / dtypes / layouts), so a
  crafted file cannot run code. torch's own ``FileSystemReader.read_metadata`` uses plain
  ``pickle``; call :func:`load_metadata` first to refuse a hostile file before megatron-core or
  torch unpickle it.
- :func:`storage_problems` checks that every described item has a storage record and no record
  is of an undescribed item (:func:`coverage_problems`), and that every storage item names a
  plain shard file *inside* the checkpoint (no ``/``, no ``..``), that the file exists, and that
  the item's byte range lies within it — the checks that catch a ``.metadata`` describing
  another save's shards.
- :func:`crc_problems` re-computes the CRC-32 of every record of every item's ``torch.save``
  blob (an uncompressed zip) and compares it with the CRC the zip stores: bit rot in tensor data.

- :func:`open_regular` / :func:`read_regular` / :func:`regular_size` are the one way any tool
  opens a file of a checkpoint (manifest, ``.metadata``, ``common.pt``, shards, the tracker
  file): a regular file, not a symlink, FIFO, device, socket or directory, and a read bounded by
  its size. A FIFO in place of ``.metadata`` is refused at once instead of blocking the reader
  forever; a shard that is a symlink to a file outside the checkpoint is refused, not followed.

All return plain lists of human-readable problems (empty: fine) or raise :class:`IntegrityError`.
"""

from __future__ import annotations

import os
import pickle
import stat
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METADATA_FILE = ".metadata"
#: The suffix torch's FileSystemWriter gives shard files.
SHARD_SUFFIX = ".distcp"
#: Bytes read per ``read`` while computing CRCs (bounds memory whatever the tensor size).
_CRC_CHUNK = 8 << 20

# (module, name) pairs a DCP ``.metadata`` pickle may reference: the metadata dataclasses, the
# planner records megatron-core keeps in it (``all_local_plans``), and torch value types. Nothing
# here runs code when called with pickled arguments: dataclasses, enums, torch.Size, and
# ``torch.serialization._get_layout`` (a lookup of a layout by name).
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_PLANNER = "torch.distributed.checkpoint.planner"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    (_DCP_PLANNER, name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan",
                 "ReadItem", "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    # torch records the checkpoint_id it was given, which may be a path object.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class IntegrityError(ValueError):
    """A checkpoint's files are missing, inconsistent, corrupt or unsafe to load."""


#: Size bounds of the files read whole (a bigger regular file is refused, not read).
MAX_MANIFEST_BYTES = 64 << 20
MAX_TRACKER_BYTES = 4096
MAX_METADATA_BYTES = 4 << 30
MAX_COMMON_BYTES = 4 << 30

_TYPE_NAMES = (
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _not_regular(path: str | os.PathLike, mode: int) -> IntegrityError:
    kind = next((name for test, name in _TYPE_NAMES if test(mode)), "special file")
    if stat.S_ISLNK(mode):
        try:
            kind += f" to {os.readlink(path)}"
        except OSError:
            pass
    return IntegrityError(
        f"{path} is a {kind}, not a regular file: checkpoint files must be regular files inside "
        "the checkpoint directory; refusing to read it"
    )


def regular_size(path: str | os.PathLike) -> int:
    """The size of ``path`` if it is a regular file (symlinks are not followed).

    Raises:
        FileNotFoundError: there is nothing at ``path``.
        IntegrityError: it is a symlink, FIFO, device, socket or directory.
    """
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st.st_size


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
    """``path`` opened for binary reading, only if it is a regular file of at most
    ``max_bytes``: the one way a checkpoint file is opened.

    Checked with ``lstat`` before opening (a FIFO or device is never opened), then opened with
    ``O_NOFOLLOW | O_NONBLOCK`` and checked again on the descriptor, so neither a symlink nor a
    FIFO swapped in between can redirect or block the read.

    Raises:
        FileNotFoundError: there is nothing at ``path``.
        IntegrityError: not a regular file, bigger than ``max_bytes``, or cannot be opened.
    """
    regular_size(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise IntegrityError(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise IntegrityError(
                f"{path}: {st.st_size} bytes, more than the {max_bytes} such a file may have; "
                "refusing to read it"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path`` (:func:`open_regular`), never more than ``max_bytes``."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the check
        raise IntegrityError(f"{path}: more than {max_bytes} bytes; refusing to read it")
    return data


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata types; anything else (``os.system``…) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype,
                                                                          torch.memory_format,
                                                                          torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def load_metadata(checkpoint_dir: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` of a torch_dist checkpoint, read without trusting the pickle.

    Raises:
        IntegrityError: ``.metadata`` is missing, unreadable, not DCP metadata, or references
            anything but the DCP metadata types.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(checkpoint_dir) / METADATA_FILE
    try:
        with open_regular(path, MAX_METADATA_BYTES) as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as e:
        raise IntegrityError(f"{checkpoint_dir}: missing {METADATA_FILE}") from e
    except IntegrityError:
        raise
    except Exception as e:  # any unpickling failure is corruption or a crafted file
        raise IntegrityError(
            f"{path}: unreadable or unsafe metadata ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(metadata, Metadata):
        raise IntegrityError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    if not isinstance(getattr(metadata, "storage_data", None), dict):
        raise IntegrityError(f"{path}: no storage index (storage_data)")
    return metadata


def check_relative_path(relative_path: Any) -> str:
    """``relative_path`` if it is a plain shard file name inside the checkpoint directory.

    Refuses separators, ``..``, absolute paths, hidden names and anything not ``*.distcp``: a
    crafted ``.metadata`` must not make a tool read or write outside the checkpoint.
    """
    if not isinstance(relative_path, str) or not relative_path:
        raise IntegrityError(f"shard file name {relative_path!r} is not a plain file name")
    bad = (
        "/" in relative_path
        or "\\" in relative_path
        or "\0" in relative_path
        or relative_path.startswith(".")
        or os.path.basename(relative_path) != relative_path
        or not relative_path.endswith(SHARD_SUFFIX)
    )
    if bad:
        raise IntegrityError(
            f"shard file name {relative_path!r} is not a plain *{SHARD_SUFFIX} name inside the "
            "checkpoint directory (crafted or corrupt .metadata)"
        )
    return relative_path


def storage_location(info: Any) -> tuple[str, int, int]:
    """(relative_path, offset, length) of one storage record, with the name checked."""
    try:
        rel, offset, length = info.relative_path, info.offset, info.length
    except AttributeError as e:
        raise IntegrityError(f"storage record {info!r} is not a FileSystemWriter record") from e
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise IntegrityError(f"storage record of {rel!r} has offset {offset!r}, length {length!r}")
    return check_relative_path(rel), offset, length


def _chunk_key(fqn: str, offsets: Any) -> tuple[str, tuple[int, ...] | None]:
    return fqn, None if offsets is None else tuple(int(o) for o in offsets)


def coverage_problems(metadata: Any) -> list[str]:
    """Items the state dict describes without a storage record, and records of no item.

    A ``.metadata`` whose storage index came from another save (two saves' write results
    crossed) lists that save's items: for the bigger save some items have no record at all,
    even when every byte range it does list happens to fit inside this directory's files.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, dict):
        return ["the metadata has no item index (state_dict_metadata)"]
    described: set[tuple[str, tuple[int, ...] | None]] = set()
    for fqn, item in items.items():
        if isinstance(item, TensorStorageMetadata):
            described.update(_chunk_key(fqn, c.offsets) for c in item.chunks)
        else:
            described.add(_chunk_key(fqn, None))
    stored = {
        _chunk_key(getattr(i, "fqn", i), getattr(i, "offset", None)) for i in metadata.storage_data
    }
    problems = [
        f"{fqn} (chunk at {off}): described but has no storage record"
        for fqn, off in sorted(described - stored, key=str)
    ]
    problems += [
        f"{fqn} (chunk at {off}): storage record of an item the metadata does not describe"
        for fqn, off in sorted(stored - described, key=str)
    ]
    return problems


def storage_problems(checkpoint_dir: str | os.PathLike, metadata: Any = None) -> list[str]:
    """What is wrong with the storage items of a torch_dist checkpoint (empty: consistent).

    Every described item must have exactly the storage records the state dict lists
    (:func:`coverage_problems`), and every record must name a plain shard file of this directory
    that exists, is a regular file (not a symlink, FIFO or device: :func:`regular_size`) and is
    long enough for the item's byte range. Cheap: one ``lstat`` per file, no data read.
    """
    root = Path(checkpoint_dir)
    if metadata is None:
        try:
            metadata = load_metadata(root)
        except IntegrityError as e:
            return [str(e)]
    sizes: dict[str, int | None] = {}
    problems: list[str] = coverage_problems(metadata)
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", index)
        try:
            rel, offset, length = storage_location(info)
        except IntegrityError as e:
            problems.append(f"{fqn}: {e}")
            continue
        if rel not in sizes:
            try:
                sizes[rel] = regular_size(root / rel)
            except FileNotFoundError:
                sizes[rel] = None
                problems.append(f"shard file {rel} is missing")
            except IntegrityError as e:
                sizes[rel] = None
                problems.append(f"shard file {rel}: {e}")
        size = sizes[rel]
        if size is not None and offset + length > size:
            problems.append(
                f"{fqn}: bytes {offset}..{offset + length} lie past the end of {rel} "
                f"({size} bytes: truncated?)"
            )
    return problems


def blob_crc_problems(read_at: Any, length: int, what: str) -> list[str]:
    """CRC-32 mismatches of the records of one ``torch.save`` blob (empty when all match).

    ``read_at(offset, size)`` reads the blob's bytes. A blob that is not a zip (e.g. raw bytes of
    a non-tensor item) carries no CRC and yields no problem.
    """
    from megatron_wsm.checkpoint import dcp_format as fmt

    try:
        blob = fmt.BlobReader(read_at, length)
        records = fmt.parse_zip(blob)
    except fmt.FormatError as e:
        if "no end-of-central-directory" in str(e):
            return []  # not a zip blob: nothing to verify
        return [f"{what}: {e}"]
    problems = []
    for record in records:
        crc, done = 0, 0
        while done < record.size:
            size = min(_CRC_CHUNK, record.size - done)
            data = read_at(record.data_offset + done, size)
            if len(data) != size:
                problems.append(f"{what}: record {record.name} is truncated")
                break
            crc = zlib.crc32(data, crc)
            done += size
        else:
            if crc != record.crc:
                problems.append(
                    f"{what}: CRC-32 mismatch in {record.name} (stored {record.crc:08x}, data "
                    f"{crc:08x}): the bytes changed after they were written (bit rot?)"
                )
    return problems


def shard_files(metadata: Any) -> list[str]:
    """The distinct (checked) shard file names a checkpoint's metadata refers to, sorted."""
    names = set()
    for info in metadata.storage_data.values():
        try:
            names.add(storage_location(info)[0])
        except IntegrityError:
            continue
    return sorted(names)


def crc_problems(
    checkpoint_dir: str | os.PathLike,
    metadata: Any = None,
    fqns: Iterable[str] | None = None,
    files: Iterable[str] | None = None,
) -> list[str]:
    """CRC-32 mismatches in the items of a checkpoint (all items, or those of ``fqns`` and/or
    stored in ``files``: several processes can split the work by file).

    Reads every byte of the items checked; items whose range is already inconsistent are left
    to :func:`storage_problems`.
    """
    root = Path(checkpoint_dir)
    if metadata is None:
        metadata = load_metadata(root)
    wanted = set(fqns) if fqns is not None else None
    in_files = set(files) if files is not None else None
    problems: list[str] = []
    handles: dict[str, Any] = {}
    try:
        for index, info in metadata.storage_data.items():
            if wanted is not None and index.fqn not in wanted:
                continue
            if in_files is not None and getattr(info, "relative_path", None) not in in_files:
                continue
            try:
                rel, offset, length = storage_location(info)
                f = handles.get(rel) or handles.setdefault(rel, open_regular(root / rel))
            except (IntegrityError, OSError):
                continue

            def read_at(pos: int, size: int, f: Any = f, offset: int = offset) -> bytes:
                return os.pread(f.fileno(), size, offset + pos)

            problems += blob_crc_problems(read_at, length, f"{rel} item {index.fqn}")
    finally:
        for f in handles.values():
            f.close()
    return problems


def verify(checkpoint_dir: str | os.PathLike, *, crc: bool = False) -> list[str]:
    """Every problem of a torch_dist checkpoint: metadata, shard names/ranges, and with ``crc``
    the CRC-32 of all item data. Empty when the checkpoint is consistent."""
    try:
        metadata = load_metadata(checkpoint_dir)
    except IntegrityError as e:
        return [str(e)]
    problems = storage_problems(checkpoint_dir, metadata)
    if crc and not problems:
        problems += crc_problems(checkpoint_dir, metadata)
    return problems
