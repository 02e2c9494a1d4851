"""The plan of a torch_dist merge: what each key becomes, every input checked, output layout.

:func:`build_plan` reads every input's ``.metadata`` and the newest input's zip records, checks
the inputs share one layout, classifies each key (average / copy / drop) and fixes every output
storage item's file, offset and length before any data moves (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import dcp_format as fmt
from megatron_wsm.checkpoint import integrity as ckpt_integrity
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
#: megatron-core >= 0.19's embedded common state: not copied as an item, written (stripped of
#: optimizer/RNG entries) as the output's ``common.pt``, which 0.16-0.19 all read.
ACTION_TO_COMMON = "to_common"

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
    if ckpt_common.is_common_state_key(fqn):
        return ACTION_TO_COMMON
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
            try:  # a regular file inside the input: no symlink out of it, no FIFO
                sizes[path] = ckpt_integrity.regular_size(path)
            except FileNotFoundError as e:
                if not inp.path.is_dir():
                    raise MergeError(gone_message(inp.path)) from e
                raise MergeError(f"{inp.path}: shard file {rel} is missing") from e
            except ckpt_integrity.IntegrityError as e:
                raise MergeError(f"{inp.path}: {e}") from e
        if offset + length > sizes[path]:
            raise MergeError(
                f"{inp.path}: shard file {rel} is truncated ({sizes[path]} bytes, item "
                f"{index.fqn} needs {offset + length})"
            )
        return path, offset, length, rel

    items = []
    for index in ref.storage_data:
        action = actions.get(index.fqn, ACTION_COPY)
        if action in (ACTION_DROP, ACTION_TO_COMMON):
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
        with ckpt_integrity.open_regular(path) as f:
            return os.pread(f.fileno(), size, offset + pos)

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
        common, notes = load_common(inputs[-1].path, metas[-1])
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
        with ckpt_integrity.open_regular(path) as f:

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


def load_common(newest: Path, metadata: Any = None) -> tuple[Any, list[str]]:
    """The newest input's common state (``common.pt`` or megatron-core >= 0.19's embedded
    ``common_state`` object, read by :mod:`megatron_wsm.checkpoint.common_state`) minus
    optimizer/RNG, with notes.

    A common state that does not load with ``weights_only`` (or fails its CRC) is refused rather
    than copied byte for byte: the merged checkpoint would carry an unverified pickle under our
    manifest.
    """
    try:
        state = ckpt_common.read_common_state(newest, metadata)
    except (ckpt_common.CommonStateError, ckpt_integrity.IntegrityError) as e:
        raise MergeError(str(e)) from e
    if state is None:
        return None, []
    notes = []
    if not (newest / ckpt_common.COMMON_FILE).is_file():
        notes.append(
            "common state read from the newest input's embedded common_state object "
            "(megatron-core >= 0.19) and written as common.pt (read by megatron-core 0.16-0.19)"
        )
    if isinstance(state, dict):
        removed = [k for k in COMMON_DROPPED if k in state]
        if removed:
            state = {k: v for k, v in state.items() if k not in COMMON_DROPPED}
            notes.append(f"{', '.join(removed)} entries removed from the common state")
    return state, notes
