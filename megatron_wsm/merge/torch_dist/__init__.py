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

Modules: :mod:`.plan` (classify keys, check the inputs, fix the output layout),
:mod:`.streaming` (pieces, buffers, one rank's threaded :class:`Streamer`) and :mod:`.finalize`
(CRCs, zip frames, merged ``.metadata``, ``common.pt``, and the collective :func:`stream`).
Every public name is re-exported here; import from ``megatron_wsm.merge.torch_dist``.
"""

from __future__ import annotations

from megatron_wsm.merge.torch_dist.finalize import (
    check_input_crcs,
    combine_crcs,
    create_output_files,
    layout_sizes,
    merged_metadata,
    stream,
    write_common,
    write_item_frames,
)
from megatron_wsm.merge.torch_dist.plan import (
    ACTION_AVERAGE,
    ACTION_COPY,
    ACTION_DROP,
    ACTION_TO_COMMON,
    COMMON_DROPPED,
    DELAY_ENV,
    OPTIMIZER_KEY,
    RNG_KEY,
    Item,
    Plan,
    build_plan,
    check_metadata,
    classify,
    crc_mismatch,
    gone_message,
    inspect_item,
    is_dropped,
    layout_output,
    load_common,
)
from megatron_wsm.merge.torch_dist.streaming import (
    BLOCK,
    GROUP_DEPTH,
    OUT_DEPTH,
    Buffers,
    Piece,
    Streamer,
    make_pieces,
    piece_elements,
    plan_buffers,
    split_pieces,
    write_failed,
)

__all__ = [
    "OPTIMIZER_KEY",
    "RNG_KEY",
    "DELAY_ENV",
    "ACTION_AVERAGE",
    "ACTION_COPY",
    "ACTION_DROP",
    "ACTION_TO_COMMON",
    "is_dropped",
    "classify",
    "Item",
    "Plan",
    "gone_message",
    "check_metadata",
    "inspect_item",
    "crc_mismatch",
    "layout_output",
    "build_plan",
    "COMMON_DROPPED",
    "load_common",
    "Piece",
    "Buffers",
    "GROUP_DEPTH",
    "OUT_DEPTH",
    "BLOCK",
    "plan_buffers",
    "piece_elements",
    "make_pieces",
    "split_pieces",
    "write_failed",
    "Streamer",
    "combine_crcs",
    "check_input_crcs",
    "write_item_frames",
    "create_output_files",
    "layout_sizes",
    "merged_metadata",
    "write_common",
    "stream",
]
