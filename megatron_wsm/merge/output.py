"""Where a merge writes and how it publishes: the output rule, the temporary directory, the
merged manifest, the provenance, and write errors named after the user's ``--save``.

The location and ``--overwrite`` rule is :mod:`megatron_wsm.checkpoint.publish`'s, shared with
the export; this module only describes what a merged checkpoint holds (:data:`MERGED_OUTPUT`).
The engines fill a hidden temporary sibling (:func:`make_tmp_dir`); :func:`publish_merged`
writes the provenance and, last, the manifest marking it complete, then renames it into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import publish
from megatron_wsm.checkpoint.layout import TRACKER_FILE, checkpoint_name, parse_name
from megatron_wsm.checkpoint.manifest import (
    KIND_MERGED,
    MANIFEST_NAME,
    CheckpointManifest,
    read_manifest,
    write_manifest,
)
from megatron_wsm.merge import torch_dist
from megatron_wsm.merge.common import MergeError, MergeReport
from megatron_wsm.merge.inputs import CheckpointInput

#: Human-readable provenance written next to the manifest.
PROVENANCE_NAME = "wsm_merge_provenance.json"
#: What the merged checkpoint leaves out, said in the report's notes and the provenance.
OPTIMIZER_NOTE = (
    "optimizer state and RNG state dropped: the merged checkpoint holds model weights only "
    "(evaluate it, or continue training from it with a fresh optimizer)"
)


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


# ----------------------------------------------------------------------------- Megatron-LM root
#
# Megatron-LM's --load takes a root: it reads ``latest_checkpointed_iteration.txt`` and loads
# ``<root>/iter_<N:07d>`` (megatron/training/checkpointing.py: _load_base_checkpoint,
# get_checkpoint_name); a directory that is itself a checkpoint is "not found". So a merge whose
# --save is named ``iter_<N:07d>`` (N: the merged checkpoint's iteration, its newest input's)
# gets the tracker in its parent, when that parent is a root of merged checkpoints only: never
# a training run's save directory (whose tracker names its newest full checkpoint). The merged
# directory itself stays what our tools read (one checkpoint, manifest inside).


def merged_iteration(inputs: Sequence[CheckpointInput]) -> int:
    """The iteration the merged checkpoint's manifest records: its newest input's."""
    newest = inputs[-1]
    if newest.manifest is not None:
        return newest.manifest.iteration
    return newest.iteration or 0


def output_name_refusal(output: Path, iteration: int) -> str | None:
    """Why an ``iter_*``-named ``output`` cannot hold a merged checkpoint of ``iteration``
    (our readers refuse a checkpoint whose name and manifest disagree), else None."""
    parsed = parse_name(output.name)
    if parsed is None or parsed[1]:
        return None
    if parsed[0] != iteration:
        return (
            f"--save {output} names iteration {parsed[0]}, but the merged checkpoint is of "
            f"iteration {iteration} (its newest input's): name it {checkpoint_name(iteration)} "
            "(Megatron-LM's layout) or give it a name without iter_"
        )
    return None


def _merged_root_refusal(root: Path) -> str | None:
    """Why ``root`` is not a root of merged checkpoints only (None: it is): every entry is a
    merged ``iter_*`` checkpoint of ours, a merge's temporary directory, or the tracker."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    for entry in entries:
        name = entry.name
        if entry.is_symlink():
            return f"holds {name}, a symbolic link"
        if name == TRACKER_FILE and entry.is_file(follow_symlinks=False):
            continue
        if name.startswith(".") and ".merging-" in name and entry.is_dir():
            continue  # a merge in progress (or interrupted): named by make_tmp_dir
        parsed = parse_name(name)
        if parsed is not None and not parsed[1] and entry.is_dir():
            try:
                manifest = read_manifest(Path(entry.path))
            except ValueError:
                manifest = None
            if manifest is not None and manifest.kind == KIND_MERGED:
                continue
        return f"holds {name}, which is not a merged checkpoint"
    return None


def write_megatron_lm_tracker(output: Path) -> str | None:
    """After publishing ``output``: Megatron-LM's tracker in its parent when ``output`` is named
    ``iter_<N:07d>`` and the parent holds merged checkpoints only; returns a note saying what
    was done or why not (None when ``output``'s name is not Megatron-LM's)."""
    parsed = parse_name(output.name)
    if parsed is None or parsed[1] or output.name != checkpoint_name(parsed[0]):
        return None
    root = output.parent
    why = _merged_root_refusal(root)
    if why:
        return (
            f"Megatron-LM's tracker not written: {root} {why} (it is written only into a "
            "directory of merged checkpoints; a training run's tracker is never replaced)"
        )
    tmp = root / f".{TRACKER_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(parsed[0]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER_FILE)
    return (
        f"Megatron-LM loads it as weights with --load {root} --finetune --no-load-optim "
        f"--no-load-rng ({root / TRACKER_FILE} names iteration {parsed[0]})"
    )


def stale_tmp_dirs_note(output: Path) -> str | None:
    """A note naming temporary directories that interrupted merges left beside ``output``."""
    stale = sorted(p.name for p in output.parent.glob(f".{output.name}.merging-*"))
    if stale:
        return f"stale temporary directories of interrupted merges (remove them): {stale}"
    return None


def make_tmp_dir(output: Path) -> Path:
    """Create the hidden temporary sibling of ``output`` that the engines fill."""
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
            "note": OPTIMIZER_NOTE,
            "keys": report.dropped_keys,
        },
        "notes": report.notes,
        "newest_input": str(inputs[-1].path),
    }


def merged_manifest(
    inputs: list[CheckpointInput], report: MergeReport, prov: dict[str, Any]
) -> CheckpointManifest:
    """The output's manifest: the newest input's, of kind ``merged``, complete, with the
    provenance and the newest input's run description in ``extra``."""
    newest = inputs[-1]
    if newest.manifest is not None:
        base = dataclasses.replace(newest.manifest)
    else:
        base = CheckpointManifest(kind=KIND_MERGED, iteration=merged_iteration(inputs))
    base.kind = KIND_MERGED
    base.checkpoint_format = report.format
    base.complete = True
    base.created_unix = time.time()
    # Keep the newest input's run description (model flags, data, seq length) so that
    # tools/evaluate.py can rebuild the model from the merged checkpoint alone.
    run = newest.manifest.extra.get("run") if newest.manifest is not None else None
    base.extra = {"provenance": prov, **({"run": run} if run else {})}
    return base


def publish_merged(
    tmp: Path, output: Path, overwrite: bool, report: MergeReport,
    inputs: list[CheckpointInput], method: dict[str, Any] | None,
) -> None:
    """Write the provenance and manifest into the filled ``tmp`` and rename it to ``output``;
    MergeError naming ``--save`` when a write or the rename fails."""
    try:
        _publish(tmp, output, overwrite, report, inputs, method)
    except OSError as e:  # ENOSPC writing the manifest, a failed rename...
        raise MergeError(_save_failed(output, e.strerror or str(e), e.filename or tmp)) from e


def _publish(
    tmp: Path,
    output: Path,
    overwrite: bool,
    report: MergeReport,
    inputs: list[CheckpointInput],
    method: dict[str, Any] | None,
) -> None:
    why = output_name_refusal(output, merged_iteration(inputs))
    if why:
        raise MergeError(why)
    prov = provenance(report, inputs, method)
    with open(tmp / PROVENANCE_NAME, "w") as f:
        json.dump(prov, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    write_manifest(tmp, merged_manifest(inputs, report, prov))  # last: marks it complete
    publish.publish_dir(tmp, output, MERGED_OUTPUT, overwrite, refuse=_raise_merge_error)
    note = write_megatron_lm_tracker(output)
    if note:
        report.notes.append(note)


def _raise_merge_error(message: str) -> None:
    raise MergeError(message)


def _save_failed(output: Path, why: str, where: str | os.PathLike) -> str:
    return f"writing --save {output} failed: {why} (at {where})"


def naming_save(message: str, tmp: Path, output: Path | None) -> str:
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
