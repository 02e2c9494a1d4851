"""Byte-level knowledge of torch_dist (torch DCP) checkpoints, kept in one place.

A torch_dist checkpoint directory (megatron-core ``dist_checkpointing``, torch ``FileSystemWriter``)
holds ``.metadata`` (a pickled :class:`torch.distributed.checkpoint.metadata.Metadata`) and
``*.distcp`` files. Each storage item is a byte range of one ``.distcp`` file, found through
``Metadata.storage_data[MetadataIndex] -> (relative_path, offset, length)``. A tensor item is a
complete ``torch.save`` blob: an uncompressed (STORED) zip archive whose ``<prefix>/data/<key>``
record holds the raw storage bytes and whose ``<prefix>/data.pkl`` describes dtype, shape and
strides. Because the storage bytes sit uncompressed at a known offset, the merge can stream them
in chunks straight from the files, without ``torch.load``-ing whole tensors.

What this module relies on that is not public torch API (and checks, with clear errors):

- ``torch.distributed.checkpoint.filesystem._StorageInfo``: the per-item storage record. Reading
  uses duck typing (``relative_path``/``offset``/``length``); writing the merged ``.metadata``
  needs the class itself, so :func:`make_storage_info` is the single place that touches it.
- the ``torch.save`` zip layout: one ``data/<key>`` record per storage, ``data.pkl`` pickled with
  protocol 2 and the storage class named by a ``GLOBAL torch <Name>Storage`` opcode. Only
  :func:`retype_tensor_pickle` (used for ``--output-dtype`` conversions) depends on the latter.

Everything here is pure byte manipulation: no process groups, no megatron-core.
"""

from __future__ import annotations

import dataclasses
import pickle
import pickletools
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Name of the pickled DCP metadata file inside a torch_dist checkpoint.
METADATA_FILE = ".metadata"

# Zip signatures (APPNOTE.TXT); torch.save writes STORED records with 64-byte aligned data.
_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_DATA_DESCRIPTOR_SIG = b"PK\x07\x08"
_LOCAL_FMT = "<4sHHHHHIIIHH"  # 30 bytes
_CENTRAL_FMT = "<4sHHHHHHIIIHHHHHII"  # 46 bytes
_EOCD_FMT = "<4sHHHHIIH"  # 22 bytes
_ZIP64_EOCD_FMT = "<4sQHHIIQQQQ"  # 56 bytes
_ZIP64_LOCATOR_FMT = "<4sIQI"  # 20 bytes
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_FLAG_DATA_DESCRIPTOR = 0x0008
_FLAG_UTF8 = 0x0800
_ALIGNMENT = 64  # torch aligns storage data to 64 bytes (mmap-friendly); keep doing so

_STORAGE_RECORD = re.compile(r"^[^/]+/data/[^/]+$")
_PICKLE_RECORD = re.compile(r"^[^/]+/data\.pkl$")
_BYTEORDER_RECORD = re.compile(r"^[^/]+/byteorder$")

#: Storage class names torch.save pickles for each floating dtype (``GLOBAL torch <Name>``).
STORAGE_CLASS_NAMES: dict[torch.dtype, str] = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
}


class FormatError(ValueError):
    """A checkpoint item is not laid out the way a torch_dist/torch.save blob must be."""


# ----------------------------------------------------------------------------- torch support


def _storage_info_class() -> type:
    try:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
    except ImportError as e:  # pragma: no cover - depends on the torch version
        raise FormatError(
            f"torch {torch.__version__} has no torch.distributed.checkpoint.filesystem."
            "_StorageInfo; this merge tool needs a torch with the FileSystemWriter storage "
            "layout of torch 2.x"
        ) from e
    fields = {f.name for f in dataclasses.fields(_StorageInfo)}
    if not {"relative_path", "offset", "length"} <= fields:  # pragma: no cover
        raise FormatError(f"unexpected _StorageInfo fields {sorted(fields)} in this torch")
    return _StorageInfo


def make_storage_info(relative_path: str, offset: int, length: int) -> Any:
    """The per-item storage record torch's ``FileSystemReader`` expects in ``storage_data``."""
    return _storage_info_class()(relative_path=relative_path, offset=offset, length=length)


def storage_location(info: Any) -> tuple[str, int, int]:
    """(relative_path, offset, length) of a storage record; refuses transformed items."""
    try:
        path, offset, length = info.relative_path, int(info.offset), int(info.length)
    except AttributeError as e:
        raise FormatError(f"unsupported storage record {info!r} (not from FileSystemWriter)") from e
    if getattr(info, "transform_descriptors", None):
        raise FormatError(
            f"item stored with transforms {info.transform_descriptors} (e.g. compression); "
            "only plain torch_dist items can be merged"
        )
    return str(path), offset, length


def read_metadata(checkpoint_dir: str) -> Any:
    """The DCP ``Metadata`` of a checkpoint, through torch's public reader."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(checkpoint_dir).read_metadata()


def write_metadata(path: str, metadata: Any) -> None:
    """Write ``metadata`` the way torch's ``FileSystemWriter.finish`` does (a plain pickle)."""
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


# ----------------------------------------------------------------------------- zip parsing


@dataclasses.dataclass(frozen=True)
class ZipRecord:
    """One record of a STORED zip blob; offsets are relative to the blob start."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    crc: int
    #: Offsets of every CRC-32 field that describes this record (local header unless a data
    #: descriptor is used, the data descriptor, the central directory entry).
    crc_fields: tuple[int, ...]


class BlobReader:
    """Random access to one item of a file, caching its first and last few KiB.

    A torch.save blob keeps its small records (headers, ``data.pkl``) at the start and the
    central directory at the end, so parsing one costs two reads.
    """

    EDGE = 4096

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self.length = length
        head_len = min(length, self.EDGE)
        self._head = read_at(0, head_len)
        tail_start = max(head_len, length - self.EDGE)
        self._tail_start = tail_start
        self._tail = read_at(tail_start, length - tail_start) if tail_start < length else b""
        if len(self._head) != head_len or len(self._tail) != length - tail_start:
            raise FormatError("item is truncated (file shorter than its storage record says)")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (relative to the blob); FormatError past the end."""
        if offset < 0 or size < 0 or offset + size > self.length:
            raise FormatError(
                f"zip structure points outside the item (offset {offset}, size {size}, "
                f"item length {self.length})"
            )
        end = offset + size
        if end <= len(self._head):
            return self._head[offset:end]
        if offset >= self._tail_start:
            return self._tail[offset - self._tail_start : end - self._tail_start]
        data = self._read_at(offset, size)
        if len(data) != size:
            raise FormatError("item is truncated")
        return data


def _zip64_values(extra: bytes, wanted: Sequence[bool]) -> list[int | None]:
    """Values of the zip64 extended-information extra field, for the fields flagged ``wanted``."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, pos)
        if header_id == 1:
            values: list[int | None] = []
            cursor = pos + 4
            for flag in wanted:
                if flag:
                    (value,) = struct.unpack_from("<Q", extra, cursor)
                    values.append(value)
                    cursor += 8
                else:
                    values.append(None)
            return values
        pos += 4 + size
    raise FormatError("zip64 sizes announced but no zip64 extra field present")


def _central_directory(blob: BlobReader) -> tuple[int, int, int]:
    """(number of entries, offset, size) of the central directory."""
    tail_len = min(blob.length, blob.EDGE)
    tail = blob.read(blob.length - tail_len, tail_len)
    pos = tail.rfind(_EOCD_SIG)
    if pos < 0 or pos + 22 > len(tail):
        raise FormatError("not a torch.save zip blob (no end-of-central-directory record)")
    eocd_offset = blob.length - tail_len + pos
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from(_EOCD_FMT, tail, pos)
    if count == _U16 or cd_size == _U32 or cd_offset == _U32:
        locator = blob.read(eocd_offset - 20, 20)
        sig, _, z64_offset, _ = struct.unpack(_ZIP64_LOCATOR_FMT, locator)
        if sig != _ZIP64_LOCATOR_SIG:
            raise FormatError("zip64 end-of-central-directory locator missing")
        record = blob.read(z64_offset, 56)
        sig, _, _, _, _, _, _, count, cd_size, cd_offset = struct.unpack(_ZIP64_EOCD_FMT, record)
        if sig != _ZIP64_EOCD_SIG:
            raise FormatError("zip64 end-of-central-directory record missing")
    return count, cd_offset, cd_size


def parse_zip(blob: BlobReader) -> list[ZipRecord]:
    """Every record of a STORED zip blob (torch.save format); FormatError on anything else."""
    count, cd_offset, cd_size = _central_directory(blob)
    directory = blob.read(cd_offset, cd_size)
    records: list[ZipRecord] = []
    pos = 0
    for _ in range(count):
        if directory[pos : pos + 4] != _CENTRAL_SIG:
            raise FormatError("corrupt zip central directory")
        fields = struct.unpack_from(_CENTRAL_FMT, directory, pos)
        method, crc, csize, usize = fields[4], fields[7], fields[8], fields[9]
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        header_offset = fields[16]
        name = directory[pos + 46 : pos + 46 + name_len].decode("utf-8")
        extra = directory[pos + 46 + name_len : pos + 46 + name_len + extra_len]
        wanted = (usize == _U32, csize == _U32, header_offset == _U32)
        if any(wanted):
            z_usize, z_csize, z_offset = _zip64_values(extra, wanted)
            usize = usize if z_usize is None else z_usize
            csize = csize if z_csize is None else z_csize
            header_offset = header_offset if z_offset is None else z_offset
        if method != 0 or csize != usize:
            raise FormatError(f"zip record {name!r} is compressed; torch.save blobs are STORED")
        records.append(_locate(blob, name, header_offset, usize, crc, cd_offset + pos + 16))
        pos += 46 + name_len + extra_len + comment_len
    return records


def _locate(
    blob: BlobReader, name: str, header_offset: int, size: int, crc: int, central_crc: int
) -> ZipRecord:
    header = blob.read(header_offset, 30)
    sig, _, flags, _, _, _, _, _, _, name_len, extra_len = struct.unpack(_LOCAL_FMT, header)
    if sig != _LOCAL_SIG:
        raise FormatError(f"zip record {name!r}: local header missing")
    data_offset = header_offset + 30 + name_len + extra_len
    crc_fields = [central_crc]
    if flags & _FLAG_DATA_DESCRIPTOR:
        # The CRC follows the data, after an optional signature; the local one stays zero.
        descriptor = blob.read(data_offset + size, 4)
        crc_fields.append(data_offset + size + (4 if descriptor == _DATA_DESCRIPTOR_SIG else 0))
    else:
        crc_fields.append(header_offset + 14)
    if data_offset + size > blob.length:
        raise FormatError(f"zip record {name!r} runs past the end of the item (truncated?)")
    return ZipRecord(name, header_offset, data_offset, size, crc, tuple(sorted(crc_fields)))


# ----------------------------------------------------------------------------- tensor blobs


@dataclasses.dataclass(frozen=True)
class BlobTemplate:
    """An output tensor blob minus its storage bytes: ``prefix + data + suffix``.

    ``crc_fields`` are offsets into ``prefix + <data> + suffix`` of the CRC-32 fields of the
    storage record; they are patched once the merged data's CRC is known.
    """

    prefix: bytes
    suffix: bytes
    data_size: int
    crc_fields: tuple[int, ...]

    @property
    def length(self) -> int:
        """Total blob length."""
        return len(self.prefix) + self.data_size + len(self.suffix)

    def render(self, crc: int) -> tuple[bytes, bytes]:
        """(prefix, suffix) with every CRC field set to ``crc``."""
        prefix, suffix = bytearray(self.prefix), bytearray(self.suffix)
        data_end = len(prefix) + self.data_size
        packed = struct.pack("<I", crc & _U32)
        for off in self.crc_fields:
            if off + 4 <= len(prefix):
                prefix[off : off + 4] = packed
            else:
                suffix[off - data_end : off - data_end + 4] = packed
        return bytes(prefix), bytes(suffix)


@dataclasses.dataclass(frozen=True)
class TensorBlob:
    """Where the storage bytes of a single-tensor torch.save blob are."""

    length: int
    data_offset: int  #: storage bytes start, relative to the blob
    data_size: int
    pickle: bytes  #: ``data.pkl``: dtype, shape, strides; equal across inputs of one item
    records: tuple[ZipRecord, ...]
    storage_record: ZipRecord

    def template(self, blob: BlobReader) -> BlobTemplate:
        """This blob's own bytes around its storage, as a template for a same-dtype output."""
        end = self.data_offset + self.data_size
        return BlobTemplate(
            prefix=blob.read(0, self.data_offset),
            suffix=blob.read(end, self.length - end),
            data_size=self.data_size,
            crc_fields=self.storage_record.crc_fields,
        )


def describe_tensor_blob(blob: BlobReader) -> TensorBlob:
    """Parse a torch.save blob holding one tensor with one storage; FormatError otherwise."""
    records = parse_zip(blob)
    storages = [r for r in records if _STORAGE_RECORD.match(r.name)]
    pickles = [r for r in records if _PICKLE_RECORD.match(r.name)]
    if len(storages) != 1 or len(pickles) != 1:
        raise FormatError(
            f"expected one tensor storage and one data.pkl in the item, found "
            f"{len(storages)} storages and {len(pickles)} pickles"
        )
    for record in records:
        if _BYTEORDER_RECORD.match(record.name):
            order = blob.read(record.data_offset, record.size)
            if order != b"little":
                raise FormatError(f"item saved with byte order {order!r}; only little-endian")
    storage = storages[0]
    return TensorBlob(
        length=blob.length,
        data_offset=storage.data_offset,
        data_size=storage.size,
        pickle=blob.read(pickles[0].data_offset, pickles[0].size),
        records=tuple(records),
        storage_record=storage,
    )


def retype_tensor_pickle(data_pkl: bytes, src: torch.dtype, dst: torch.dtype) -> bytes:
    """``data.pkl`` of a saved tensor with its storage class changed from ``src`` to ``dst``.

    The element count, shape and strides stay; only the ``GLOBAL torch <Name>Storage`` opcode
    changes. Protocol-2 pickles (torch's default) have no frame lengths, so the splice is safe;
    anything else is refused.
    """
    if src == dst:
        return data_pkl
    old = f"torch {STORAGE_CLASS_NAMES[src]}"
    hits = []
    for opcode, arg, pos in pickletools.genops(data_pkl):
        if opcode.name in ("FRAME", "STACK_GLOBAL"):
            raise FormatError("tensor pickled with protocol >= 4; cannot convert its dtype")
        if opcode.name == "GLOBAL" and isinstance(arg, str) and arg.endswith("Storage"):
            hits.append((arg, pos))
    if len(hits) != 1 or hits[0][0] != old:
        raise FormatError(f"cannot find the {old!r} storage class in the tensor pickle ({hits})")
    pos = hits[0][1]
    old_op = b"c" + old.replace(" ", "\n").encode() + b"\n"
    new_op = b"c" + f"torch\n{STORAGE_CLASS_NAMES[dst]}\n".encode()
    if data_pkl[pos : pos + len(old_op)] != old_op:
        raise FormatError("unexpected GLOBAL opcode encoding in the tensor pickle")
    return data_pkl[:pos] + new_op + data_pkl[pos + len(old_op) :]


def build_tensor_blob(
    records: Sequence[tuple[str, bytes | int]], *, force_zip64: bool = False
) -> BlobTemplate:
    """A STORED zip blob in torch.save's layout, as a template around one storage record.

    ``records`` are (name, content) in archive order; exactly one content is an ``int``: the
    size of the storage record, whose bytes are streamed in later. Data starts are aligned to
    64 bytes with a ``FB`` padding extra field, as torch does, so the result also loads with
    ``torch.load(mmap=True)``. Zip64 structures are used when sizes or offsets need them.
    """
    local = bytearray()  # every local header and small record; the storage bytes are implied
    central = bytearray()
    prefix_len = data_size = -1
    storage_entry = storage_header = -1
    for name, content in records:
        is_storage = isinstance(content, int)
        size = content if is_storage else len(content)
        crc = 0 if is_storage else _crc32(content)
        # Offsets in the final blob: records after the storage sit behind its bytes.
        header_offset = len(local) + (data_size if prefix_len >= 0 else 0)
        name_b = name.encode("utf-8")
        zip64 = force_zip64 or size >= _U32
        big_offset = force_zip64 or header_offset >= _U32
        version = 45 if zip64 or big_offset else 20
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(header_offset + 30 + len(name_b) + len(extra) + 4) % _ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
        local += struct.pack(
            _LOCAL_FMT, _LOCAL_SIG, version, _FLAG_UTF8, 0, 0, 0, crc,
            _U32 if zip64 else size, _U32 if zip64 else size, len(name_b), len(extra),
        ) + name_b + extra
        if is_storage:
            if prefix_len >= 0:
                raise ValueError("build_tensor_blob takes exactly one storage record")
            prefix_len, data_size, storage_header = len(local), size, header_offset
            storage_entry = len(central)
        else:
            local += content
        values = ([size, size] if zip64 else []) + ([header_offset] if big_offset else [])
        c_extra = b""
        if values:
            c_extra = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(
                f"<{len(values)}Q", *values
            )
        central += struct.pack(
            _CENTRAL_FMT, _CENTRAL_SIG, version, version, _FLAG_UTF8, 0, 0, 0, crc,
            _U32 if zip64 else size, _U32 if zip64 else size, len(name_b), len(c_extra), 0, 0,
            0, 0, _U32 if big_offset else header_offset,
        ) + name_b + c_extra
    if prefix_len < 0:
        raise ValueError("build_tensor_blob needs one storage record given by its size")
    cd_offset = len(local) + data_size
    entries, cd_size = len(records), len(central)
    tail = bytearray(central)
    if force_zip64 or cd_offset >= _U32 or cd_size >= _U32 or entries >= _U16:
        z64_offset = cd_offset + cd_size
        tail += struct.pack(
            _ZIP64_EOCD_FMT, _ZIP64_EOCD_SIG, 44, 45, 45, 0, 0, entries, entries, cd_size,
            cd_offset,
        )
        tail += struct.pack(_ZIP64_LOCATOR_FMT, _ZIP64_LOCATOR_SIG, 0, z64_offset, 1)
        tail += struct.pack(_EOCD_FMT, _EOCD_SIG, 0, 0, _U16, _U16, _U32, _U32, 0)
    else:
        tail += struct.pack(_EOCD_FMT, _EOCD_SIG, 0, 0, entries, entries, cd_size, cd_offset, 0)
    crc_fields = (storage_header + 14, cd_offset + storage_entry + 16)
    return BlobTemplate(
        bytes(local[:prefix_len]), bytes(local[prefix_len:]) + bytes(tail), data_size, crc_fields
    )


def _crc32(data: bytes) -> int:
    import zlib

    return zlib.crc32(data) & _U32


# ----------------------------------------------------------------------------- CRC-32 combine

# zlib's crc32_combine (Python's zlib module does not expose it), after Mark Adler's
# multmodp/x2nmodp formulation: polynomial arithmetic modulo the reflected CRC-32 polynomial.
_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib semantics)."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2
