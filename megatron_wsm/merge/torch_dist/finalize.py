"""Finishing a torch_dist merge: CRCs from the ranks, zip frames, merged ``.metadata``,
``common.pt``, and :func:`stream` (the collective that creates, fills and finishes the output).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import dcp_format as fmt
from megatron_wsm.merge.common import Comm, MergeError
from megatron_wsm.merge.torch_dist.plan import (
    ACTION_AVERAGE,
    ACTION_DROP,
    ACTION_TO_COMMON,
    Plan,
    _out_dtype,
    crc_mismatch,
)
from megatron_wsm.merge.torch_dist.streaming import (
    Piece,
    Streamer,
    _Files,
    _pwrite_all,
    make_pieces,
    plan_buffers,
    split_pieces,
    write_failed,
)

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
        if action in (ACTION_DROP, ACTION_TO_COMMON):
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
        # Megatron-LM's megatron-core enums were read as stand-ins: written back under their
        # own names, so megatron-core loads them as the real types.
        from megatron_wsm.checkpoint.common_pickle import dump_common

        dump_common(plan.common, out_dir / "common.pt")


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
