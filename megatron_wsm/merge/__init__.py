"""WSM merge: the weighted average of a window of checkpoints, shard by shard, streamed.

``merge_checkpoints(inputs, coefficients, output)`` averages checkpoints that share one parallel
layout into ``output`` in that same layout: output shard s = Σ_j c_j · (shard s of input j), with
c_0 belonging to the oldest input. Formats:

- torch_dist (megatron-core ``dist_checkpointing``, what the trainer writes): item-level
  streaming over the DCP storage index, chunk-bounded memory, work split over merge ranks
  (:mod:`megatron_wsm.merge.torch_dist`);
- legacy per-rank ``torch`` files (``mp_rank_XX[_YYY]/model_optim_rng.pt``), file by file
  (:mod:`megatron_wsm.merge.legacy`).

Floating-point model tensors (buffers such as the MoE router's ``expert_bias`` included) are
averaged in fp32; everything else (integer tensors, ``_extra_state``, RNG, scheduler, iteration)
is copied from the newest input; optimizer state is dropped. The output appears atomically (a
temporary sibling directory renamed into place) with ``wsm_manifest.json`` (kind ``merged``) and
``wsm_merge_provenance.json``. Any refusal raises :class:`MergeError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_wsm.checkpoint import publish
from megatron_wsm.checkpoint.manifest import (
    KIND_MERGED,
    MANIFEST_NAME,
    CheckpointManifest,
    write_manifest,
)
from megatron_wsm.merge import legacy, torch_dist
from megatron_wsm.merge.common import Comm, MergeError, MergeReport
from megatron_wsm.merge.inputs import (
    FORMAT_TORCH,
    POSITION_UNITS,
    CheckpointInput,
    WindowSelection,
    check_compatible,
    checkpoint_positions,
    choose_window,
    inspect_input,
    order_inputs,
    select_window,
)

if TYPE_CHECKING:
    from megatron_wsm.coefficients import MergeMethod

__all__ = [
    "DEFAULT_CHUNK_MB",
    "OUTPUT_DTYPES",
    "POSITION_UNITS",
    "PROVENANCE_NAME",
    "InputPositions",
    "MergeError",
    "MergeReport",
    "WindowSelection",
    "check_output_location",
    "choose_window",
    "describe_coefficients",
    "input_positions",
    "merge_checkpoints",
    "method_coefficients",
    "resolve_coefficients",
    "select_window",
]

#: Default streaming-buffer budget per merge rank, MiB.
DEFAULT_CHUNK_MB = 256
#: ``--output-dtype`` choices: keep each tensor's dtype, or store averaged tensors as fp32/bf16.
OUTPUT_DTYPES = ("same", "fp32", "bf16")
#: Human-readable provenance written next to the manifest.
PROVENANCE_NAME = "wsm_merge_provenance.json"
_OPTIMIZER_NOTE = (
    "optimizer state and RNG state dropped: the merged checkpoint holds model weights only "
    "(evaluate it, or continue training from it with a fresh optimizer)"
)


def resolve_coefficients(
    method: MergeMethod | str | None,
    k: int,
    *,
    positions: Sequence[float] | None = None,
    **legacy: Any,
) -> list[float]:
    """Merge coefficients c_0…c_k (oldest first) of a
    :class:`~megatron_wsm.coefficients.MergeMethod` for k+1 checkpoints; ValueError (from
    :mod:`megatron_wsm.coefficients`) when invalid.

    ``positions`` p_0 < … < p_k (iterations or tokens, oldest first) evaluate a shape method's
    decay at the checkpoints' real places; evenly spaced positions, or none, give exactly the
    index-based coefficients. Custom ``weights`` / ``decay`` are taken as given whatever the
    positions. A method name (or None with ``weights=``) plus the method's fields as keywords is
    still accepted and turned into a :class:`MergeMethod`.
    """
    from megatron_wsm.coefficients import MergeMethod  # lazy: the merge engine needs only numbers

    if not isinstance(method, MergeMethod):
        method = MergeMethod(method or "custom", **legacy)
    elif legacy:
        raise TypeError(f"resolve_coefficients: {sorted(legacy)} given beside a MergeMethod")
    if positions is not None and len(positions) != k + 1:
        raise ValueError(f"{len(positions)} positions given for {k + 1} checkpoints")
    if method.method == "custom":
        if method.weights is not None and len(method.weights) != k + 1:
            raise ValueError(f"{len(method.weights)} weights given for {k + 1} checkpoints")
        return method.coefficients(k)
    return method.coefficients(list(positions) if positions is not None else k)


def method_coefficients(
    method: MergeMethod, positions: Sequence[float], positions_from: str = "iteration"
) -> list[float]:
    """c_0…c_k of ``method`` for checkpoints at ``positions`` (oldest first), as the merge tool
    and the trainer's merged readout use them; ValueError when they cannot be derived.

    The ``megatron-lm`` convention weights checkpoints by index, so it refuses unevenly
    spaced ones (``positions_from`` names the unit in the message).
    """
    from megatron_wsm.coefficients import is_evenly_spaced

    if (
        method.method != "custom"
        and method.convention == "megatron-lm"
        and not is_evenly_spaced(positions)
    ):
        raise ValueError(
            f"--convention megatron-lm weights checkpoints by index, but they are unevenly "
            f"spaced ({positions_from} {', '.join(map(str, positions))}); use --convention "
            "wsm, or --positions-from index to treat them as evenly spaced"
        )
    return resolve_coefficients(method, len(positions) - 1, positions=positions)


def describe_coefficients(
    coefficients: Sequence[float],
    *,
    method: str | None,
    positions: Sequence[float],
    unit: str,
    convention: str = "wsm",
    sampling: str = "start",
) -> dict[str, Any]:
    """What the coefficients mean, for the report and the provenance: positions and their
    ``unit``, convention, sampling, discretisation formula, zero-weight inputs and why
    (:func:`megatron_wsm.coefficients.describe_convention`), and the coefficients themselves."""
    from megatron_wsm.coefficients import describe_convention

    info = describe_convention(
        coefficients, method=method, convention=convention, positions=positions,
        sampling=sampling,
    )
    return {"position_unit": unit, **info, "coefficients": list(coefficients)}


@dataclasses.dataclass
class InputPositions:
    """Merge inputs in merge order (oldest first) and where each sits (:func:`input_positions`)."""

    paths: list[str]
    positions: list[int]
    #: ``iteration``, ``tokens`` or ``index`` (also after a fallback to the index).
    unit: str
    notes: list[str]


def input_positions(
    inputs: Sequence[str | os.PathLike],
    *,
    positions_from: str = "iteration",
    allow_no_manifest: bool = False,
    group: Any = None,
) -> InputPositions:
    """Order ``inputs`` as the merge will (oldest first) and read their positions.

    Collective over ``group`` like :func:`merge_checkpoints` (rank 0 reads the manifests and
    shares the answer). ``positions_from`` is one of :data:`POSITION_UNITS`; when an input
    lacks that number (no manifest, iteration unknown) the index is used and a note says so.
    Pass ``paths`` to :func:`merge_checkpoints` so the coefficients match its order.
    """
    def read() -> InputPositions:
        checked = [inspect_input(p, allow_no_manifest=allow_no_manifest) for p in inputs]
        ordered, notes = order_inputs(checked)
        positions, unit, more = checkpoint_positions(ordered, positions_from)
        return InputPositions([str(inp.path) for inp in ordered], positions, unit, notes + more)

    return Comm(group).run_on_rank0(read)


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
    coefs = _check_coefficients(coefficients, len(inputs), allow_negative)
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
    tmp = comm.run_on_rank0(lambda: _make_tmp_dir(output))
    try:
        read, written, buffers, more = engine.stream(
            plan, tmp, comm, int(chunk_mb * 2**20), progress
        )
        report.notes.extend(more)
        report.bytes_read, report.bytes_written = read, written
        report.buffer_bytes_per_rank = buffers
        report.seconds = time.perf_counter() - start
        comm.run_on_rank0(lambda: _publish_naming_output(tmp, output, overwrite, report,
                                                         ordered, method))
    except MergeError as e:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(_naming_save(str(e), tmp, output)) from e
    except BaseException:
        # Handled errors and interrupts alike: no temporary directory is left behind.
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def _check_coefficients(
    coefficients: Sequence[float], n_inputs: int, allow_negative: bool
) -> list[float]:
    from megatron_wsm.coefficients import validate_coefficients

    if n_inputs < 2:
        raise MergeError(f"a merge needs at least 2 checkpoints, got {n_inputs}")
    if len(coefficients) != n_inputs:
        raise MergeError(f"{len(coefficients)} coefficients for {n_inputs} checkpoints")
    try:
        return validate_coefficients(list(coefficients), allow_negative=allow_negative)
    except ValueError as e:
        raise MergeError(f"invalid merge coefficients: {e}") from e


def _prepare_inputs(
    paths: Sequence[str | os.PathLike],
    allow_no_manifest: bool,
    output: Path | None,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
) -> tuple[list[CheckpointInput], list[str]]:
    inputs = [inspect_input(p, allow_no_manifest=allow_no_manifest) for p in paths]
    ordered, notes = order_inputs(inputs)
    notes += check_compatible(ordered)
    notes.append(_OPTIMIZER_NOTE)
    if output is None:
        return ordered, notes
    check_output_location(output, [inp.path for inp in ordered], protected, overwrite)
    stale = sorted(p.name for p in output.parent.glob(f".{output.name}.merging-*"))
    if stale:
        notes.append(f"stale temporary directories of interrupted merges (remove them): {stale}")
    return ordered, notes


def _merged_marker(data: dict[str, Any]) -> str | None:
    if data.get("kind") != KIND_MERGED:
        return f"is a {data.get('kind')!r} checkpoint, not a merged one"
    return None


#: What a merged checkpoint directory holds (torch_dist, or legacy ``mp_rank_*`` files);
#: :mod:`megatron_wsm.checkpoint.publish` lets ``--overwrite`` replace nothing else.
MERGED_OUTPUT = publish.OutputKind(
    tool="the merge",
    what="a merged checkpoint",
    marker=MANIFEST_NAME,
    marker_ok=publish.json_marker(_merged_marker),
    files=(".metadata", "common.pt", "metadata.json", PROVENANCE_NAME),
    patterns=(r".+\.distcp", r"model_optim_rng\.pt"),
    subdirs=(r"mp_rank_\d+(_\d+)*",),
)


def check_output_location(
    output: Path,
    inputs: Sequence[str | os.PathLike],
    protected: Sequence[str | os.PathLike],
    overwrite: bool,
) -> None:
    """Refuse an ``output`` the merge must not create or replace (MergeError, nothing written).

    The rule of :func:`megatron_wsm.checkpoint.publish.output_refusal`, shared with the export:
    ``output`` (symlinks resolved) must not equal, lie inside or contain an input or a ``protected``
    directory, nor lie inside any checkpoint or save directory; it must not exist, unless
    ``overwrite`` and it is a merged checkpoint this tool wrote (only those files, manifest kind
    ``merged``); its parent must exist or be creatable, and be writable.
    """
    why = publish.output_refusal(output, MERGED_OUTPUT, overwrite, inputs, protected)
    if why:
        raise MergeError(why)


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


def _make_tmp_dir(output: Path) -> Path:
    # A hidden sibling on the same filesystem, so the final rename is atomic; its name never
    # looks like a checkpoint (no manifest, not iter_*), so no tool mistakes it for one.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.merging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def provenance(
    report: MergeReport, inputs: list[CheckpointInput], method: dict[str, Any] | None
) -> dict[str, Any]:
    """The merge's provenance record (also stored in the manifest's ``extra``)."""
    import megatron_wsm

    averaged = report.averaged_keys
    return {
        "tool": "megatron-wsm tools/merge_wsm.py",
        "tool_version": megatron_wsm.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": report.format,
        "inputs": report.inputs,
        "coefficients": report.coefficients,
        "implied_decay": report.implied_decay,
        "method": method,
        "output_dtype": report.output_dtype,
        "merge_ranks": report.merge_ranks,
        "averaged": {
            "count": len(averaged),
            "rule": "every floating-point model tensor, buffers included, in fp32",
            "floating_buffers": [k for k in averaged if "expert_bias" in k],
            "keys": averaged,
        },
        "copied_from_newest": {
            "count": len(report.copied_keys),
            "rule": "non-float tensors, _extra_state and other objects, common.pt",
            "keys": report.copied_keys,
        },
        "dropped": {
            "count": len(report.dropped_keys),
            "note": _OPTIMIZER_NOTE,
            "keys": report.dropped_keys,
        },
        "notes": report.notes,
        "newest_input": str(inputs[-1].path),
    }


def _merged_manifest(
    inputs: list[CheckpointInput], report: MergeReport, prov: dict[str, Any]
) -> CheckpointManifest:
    newest = inputs[-1]
    if newest.manifest is not None:
        base = dataclasses.replace(newest.manifest)
    else:
        base = CheckpointManifest(kind=KIND_MERGED, iteration=newest.iteration or 0)
    base.kind = KIND_MERGED
    base.checkpoint_format = report.format
    base.complete = True
    base.created_unix = time.time()
    # Keep the newest input's run description (model flags, data, seq length) so that
    # tools/evaluate.py can rebuild the model from the merged checkpoint alone.
    run = newest.manifest.extra.get("run") if newest.manifest is not None else None
    base.extra = {"provenance": prov, **({"run": run} if run else {})}
    return base


def _publish_naming_output(
    tmp: Path, output: Path, overwrite: bool, report: MergeReport,
    inputs: list[CheckpointInput], method: dict[str, Any] | None,
) -> None:
    try:
        _publish(tmp, output, overwrite, report, inputs, method)
    except OSError as e:  # ENOSPC writing the manifest, a failed rename...
        raise MergeError(_save_failed(output, e.strerror or str(e), e.filename or tmp)) from e


def _save_failed(output: Path, why: str, where: str | os.PathLike) -> str:
    return f"writing --save {output} failed: {why} (at {where})"


def _naming_save(message: str, tmp: Path, output: Path | None) -> str:
    """A write error in terms of the user's ``--save``, the temporary file as detail.

    The engines write into the hidden ``.<save>.merging-…`` sibling and name the file that
    failed there (:func:`torch_dist.write_failed`); a user looking for ``--save`` would not
    recognise it.
    """
    where = str(tmp)
    if output is None or where not in message or message.startswith("writing --save "):
        return message
    prefix = torch_dist.write_failed(where, OSError("")).rsplit(":", 1)[0]
    if message.startswith(prefix + ": ") or message.startswith(prefix + "/"):
        file, _, why = message[len(prefix):].partition(": ")
        return _save_failed(output, why, f"{where}{file}")
    return f"writing --save {output} failed: {message}"


def _publish(
    tmp: Path,
    output: Path,
    overwrite: bool,
    report: MergeReport,
    inputs: list[CheckpointInput],
    method: dict[str, Any] | None,
) -> None:
    prov = provenance(report, inputs, method)
    with open(tmp / PROVENANCE_NAME, "w") as f:
        json.dump(prov, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    write_manifest(tmp, _merged_manifest(inputs, report, prov))  # last: marks it complete
    publish.publish_dir(tmp, output, MERGED_OUTPUT, overwrite, refuse=_raise_merge_error)


def _raise_merge_error(message: str) -> None:
    raise MergeError(message)
