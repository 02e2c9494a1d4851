"""The merge driver: :func:`merge_checkpoints` checks, plans, streams and publishes one merge.

It reads nothing itself: the inputs are found and checked by :mod:`.inputs`, the coefficients
by :mod:`.weights`, the tensors are planned and streamed by the format's engine
(:mod:`.torch_dist` or :mod:`.legacy`), and the output is placed and published by
:mod:`.output`. A dry run stops after the plan.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_wsm.merge import legacy, torch_dist
from megatron_wsm.merge.common import Comm, MergeError, MergeReport
from megatron_wsm.merge.inputs import (
    FORMAT_TORCH,
    CheckpointInput,
    check_compatible,
    inspect_input,
    order_inputs,
)
from megatron_wsm.merge.output import (
    OPTIMIZER_NOTE,
    check_output_location,
    make_tmp_dir,
    merged_iteration,
    naming_save,
    output_name_refusal,
    publish_merged,
    stale_tmp_dirs_note,
)
from megatron_wsm.merge.weights import check_coefficients

#: Default streaming-buffer budget per merge rank, MiB.
DEFAULT_CHUNK_MB = 256
#: ``--output-dtype`` choices: keep each tensor's dtype, or store averaged tensors as fp32/bf16.
OUTPUT_DTYPES = ("same", "fp32", "bf16")


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    coefficients: Sequence[float],
    output: str | os.PathLike | None,
    *,
    output_dtype: str = "same",
    chunk_mb: float = DEFAULT_CHUNK_MB,
    overwrite: bool = False,
    group: Any = None,
    allow_no_manifest: bool = False,
    allow_negative: bool = False,
    method: dict[str, Any] | None = None,
    progress: bool = False,
    dry_run: bool = False,
    protected: Sequence[str | os.PathLike] = (),
    verify_crc: bool = True,
    notes: Sequence[str] = (),
) -> MergeReport:
    """Average ``inputs`` with ``coefficients`` into the checkpoint directory ``output``.

    Collective over ``group`` (default: the whole torch.distributed world when initialised,
    else this process alone): every merge rank calls it with the same arguments and streams
    its share. Inputs are sorted oldest first when their iterations are known (from the
    manifests or ``iter_N`` names); ``coefficients[j]`` belongs to the j-th oldest.

    Args:
        inputs: checkpoint directories (torch_dist or legacy ``torch``), one layout.
        coefficients: c_0…c_k, summing to 1 (non-negative unless ``allow_negative``).
        output: the merged checkpoint directory; must not exist unless ``overwrite``
            (may be None for a dry run).
        output_dtype: ``same``, ``fp32`` or ``bf16`` for the averaged tensors.
        chunk_mb: streaming-buffer budget per merge rank (MiB); bounds the merge's memory.
        allow_no_manifest: accept checkpoints without ``wsm_manifest.json`` (other tools').
        method: description of how the coefficients were chosen, for the provenance.
        progress: show a tqdm bar on rank 0.
        dry_run: validate and plan only; nothing is written (``output``'s placement and
            writability are still checked).
        protected: directories ``output`` must not lie in, equal or contain besides the
            inputs (the CLI passes ``--load-dir``: the trainer prunes what lies there).
        verify_crc: check every input byte read against its zip record's CRC-32 (only a
            benchmark turns this off).
        notes: the caller's notes for the report and the provenance (positions, skipped
            checkpoints, zero weights), before the merge's own.

    Returns:
        A :class:`MergeReport` (identical on every rank).

    Raises:
        MergeError: refused inputs or a failed merge; nothing is left at ``output``.
    """
    start = time.perf_counter()
    comm = Comm(group)
    if output is None and not dry_run:
        raise MergeError("an output directory is needed (or a dry run)")
    output = Path(output) if output is not None else None
    if output_dtype not in OUTPUT_DTYPES:
        raise MergeError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {output_dtype!r}")
    if not chunk_mb or chunk_mb <= 0:
        raise MergeError(f"chunk_mb must be positive, got {chunk_mb}")
    coefs = check_coefficients(coefficients, len(inputs), allow_negative)
    ordered, found = comm.run_on_rank0(
        lambda: _prepare_inputs(inputs, allow_no_manifest, output, overwrite, protected)
    )
    notes = [*notes, *found]
    if ordered[0].format == FORMAT_TORCH:
        plan = legacy.build_plan(ordered, coefs, output_dtype, comm)
        engine: Any = legacy
    else:
        plan = torch_dist.build_plan(ordered, coefs, output_dtype, comm, verify_crc=verify_crc)
        engine = torch_dist
    notes = notes + plan.notes
    report = _report(plan, ordered, coefs, output, output_dtype, comm, notes, dry_run)
    if dry_run:
        return report
    tmp = comm.run_on_rank0(lambda: make_tmp_dir(output))
    try:
        read, written, buffers, more = engine.stream(
            plan, tmp, comm, int(chunk_mb * 2**20), progress
        )
        report.notes.extend(more)
        report.bytes_read, report.bytes_written = read, written
        report.buffer_bytes_per_rank = buffers
        report.seconds = time.perf_counter() - start
        comm.run_on_rank0(lambda: publish_merged(tmp, output, overwrite, report, ordered, method))
    except MergeError as e:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(naming_save(str(e), tmp, output)) from e
    except BaseException:
        # Handled errors and interrupts alike: no temporary directory is left behind.
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def _prepare_inputs(
    paths: Sequence[str | os.PathLike],
    allow_no_manifest: bool,
    output: Path | None,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
) -> tuple[list[CheckpointInput], list[str]]:
    """Rank 0's checks before any plan: the inputs (ordered oldest first, one layout) and, unless
    a dry run without ``output``, where the output goes; returns the inputs and the notes."""
    inputs = [inspect_input(p, allow_no_manifest=allow_no_manifest) for p in paths]
    ordered, notes = order_inputs(inputs)
    notes += check_compatible(ordered)
    notes.append(OPTIMIZER_NOTE)
    if output is None:
        return ordered, notes
    check_output_location(output, [inp.path for inp in ordered], protected, overwrite)
    why = output_name_refusal(output, merged_iteration(ordered))  # before the merge's work
    if why:
        raise MergeError(why)
    stale = stale_tmp_dirs_note(output)
    if stale:
        notes.append(stale)
    return ordered, notes


def _report(
    plan: Any,
    inputs: list[CheckpointInput],
    coefs: list[float],
    output: Path | None,
    output_dtype: str,
    comm: Comm,
    notes: list[str],
    dry_run: bool,
) -> MergeReport:
    from megatron_wsm.coefficients import decay_from_coefficients

    described = []
    for inp, c in zip(inputs, coefs):
        row = inp.describe()
        row["coefficient"] = c
        described.append(row)
    return MergeReport(
        output=str(output) if output is not None else "(dry run)",
        format=inputs[0].format,
        inputs=described,
        coefficients=coefs,
        implied_decay=decay_from_coefficients(coefs, allow_negative=True),
        output_dtype=output_dtype,
        bytes_read=plan.bytes_to_read(),
        bytes_written=plan.bytes_to_write(),
        merge_ranks=comm.size,
        averaged_keys=plan.keys(torch_dist.ACTION_AVERAGE),
        copied_keys=plan.keys(torch_dist.ACTION_COPY),
        dropped_keys=plan.keys(torch_dist.ACTION_DROP),
        notes=list(notes),
        dry_run=dry_run,
    )
