"""Finding, checking and ordering the checkpoints of a merge (no tensor data is read here)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint import layout
from megatron_wsm.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointManifest,
    read_manifest,
)
from megatron_wsm.merge.common import MergeError

FORMAT_TORCH_DIST = "torch_dist"
FORMAT_TORCH = "torch"  # legacy per-rank files: mp_rank_XX[_YYY[_ZZZ]]/model_optim_rng.pt

LEGACY_FILE = "model_optim_rng.pt"
_MP_RANK_RE = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")


@dataclasses.dataclass
class CheckpointInput:
    """One input checkpoint as the merge sees it."""

    path: Path
    format: str
    manifest: CheckpointManifest | None
    iteration: int | None

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the provenance and the dry run."""
        m = self.manifest
        return {
            "path": str(self.path),
            "iteration": self.iteration,
            "kind": m.kind if m else None,
            "consumed_tokens": m.consumed_tokens if m else None,
            "consumed_samples": m.consumed_samples if m else None,
            "learning_rate": m.learning_rate if m else None,
            "has_manifest": m is not None,
        }


def detect_format(path: Path) -> str | None:
    """``torch_dist``, ``torch`` (legacy per-rank files) or None for anything else."""
    if layout.has_dist_metadata(path):
        return FORMAT_TORCH_DIST
    if any(path.glob("*.distcp")) or (path / "common.pt").exists():
        return FORMAT_TORCH_DIST
    if legacy_rank_dirs(path):
        return FORMAT_TORCH
    return None


def legacy_rank_dirs(path: Path) -> list[str]:
    """Names of the ``mp_rank_*`` subdirectories holding ``model_optim_rng.pt``, sorted."""
    if not path.is_dir():
        return []
    return sorted(
        p.name for p in path.iterdir() if _MP_RANK_RE.match(p.name) and (p / LEGACY_FILE).is_file()
    )


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory meant by ``path``: itself, or the iteration a Megatron-style
    root's ``latest_checkpointed_iteration.txt`` names."""
    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"{path}: no such checkpoint directory")
    if detect_format(path) is None:
        try:
            newest = layout.read_tracker(path)
        except ckpt_integrity.IntegrityError as e:
            raise MergeError(str(e)) from e
        if newest is not None and (path / layout.checkpoint_name(newest)).is_dir():
            return path / layout.checkpoint_name(newest)
    return path


def inspect_input(path: str | os.PathLike, *, allow_no_manifest: bool = False) -> CheckpointInput:
    """Check one input is a finished checkpoint; MergeError with the reason otherwise.

    Beyond its manifest: every problem
    :func:`~megatron_wsm.checkpoint.layout.checkpoint_problems` finds without
    reading tensor data — an ``iter_N`` name, manifest and common state that disagree on the
    iteration, checkpoint files that are not regular files (FIFOs, symlinks), shards that do not
    hold what ``.metadata`` names, a missing or unreadable common state (the merged checkpoint
    would lack one and not load)."""
    path = resolve_checkpoint_dir(path)
    try:
        manifest = read_manifest(path)
    except ValueError as e:
        raise MergeError(f"{path}: {e}") from e
    if manifest is None:
        manifest = _megatron_lm_input(path, allow_no_manifest)
    if manifest is None and not allow_no_manifest:
        raise MergeError(
            f"{path}: no {MANIFEST_NAME}, so not a finished megatron-wsm checkpoint (interrupted "
            "save?); pass --allow-no-manifest to merge checkpoints written by other tools"
        )
    if manifest is not None and not manifest.complete:
        raise MergeError(f"{path}: manifest says the checkpoint is incomplete (complete=false)")
    fmt = detect_format(path)
    if fmt is None:
        raise MergeError(
            f"{path}: neither a torch_dist checkpoint (.metadata, *.distcp) nor a legacy one "
            f"(mp_rank_*/{LEGACY_FILE})"
        )
    if fmt == FORMAT_TORCH_DIST and not os.path.lexists(path / ckpt_integrity.METADATA_FILE):
        raise MergeError(f"{path}: missing .metadata: incomplete or corrupt torch_dist checkpoint")
    problems = layout.checkpoint_problems(path, manifest)
    if fmt == FORMAT_TORCH:
        problems += _legacy_file_problems(path)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MergeError(f"{path}: refusing it: {problems[0]}{more}")
    if manifest is not None:
        iteration = manifest.iteration
    else:
        iteration = layout.iteration_in_name(path.name)
        if iteration is None and fmt == FORMAT_TORCH_DIST:
            iteration = _iteration_from_common(path)
    return CheckpointInput(path=path, format=fmt, manifest=manifest, iteration=iteration)


def _megatron_lm_input(path: Path, allow_no_manifest: bool) -> CheckpointManifest | None:
    """The manifest :mod:`~megatron_wsm.checkpoint.megatron_lm` makes for a Megatron-LM
    checkpoint (None: not one). A complete one (consistent files, readable common state at its
    name's iteration, committed by its root's tracker) needs no flag; one its root's tracker does
    not vouch for (copied out of its save directory, or newer than the tracker) needs
    ``--allow-no-manifest``; anything else wrong with it is refused with the reason."""
    from megatron_wsm.checkpoint import megatron_lm

    found = megatron_lm.recognise(path)
    if found is None:
        return None
    if not found.complete and allow_no_manifest and not found.unreadable:
        loose = megatron_lm.recognise(path, need_tracker=False)
        if loose is not None and loose.complete:
            found = loose
    if not found.complete:
        hint = (
            "; pass --allow-no-manifest to merge it anyway"
            if not allow_no_manifest and "tracker" in found.problems[0]
            else ""
        )
        raise MergeError(f"{path}: a Megatron-LM checkpoint, refused: {found.problems[0]}{hint}")
    return megatron_lm.synthesized_manifest(found)


def _legacy_file_problems(path: Path) -> list[str]:
    """Legacy rank files that are not regular files inside ``path`` (a symlinked ``mp_rank_*``
    directory or ``model_optim_rng.pt``, a FIFO): refused, not followed."""
    problems = []
    for name in legacy_rank_dirs(path):
        if (path / name).is_symlink():
            problems.append(f"{path / name} is a symlink: rank directories must be inside {path}")
            continue
        try:
            ckpt_integrity.regular_size(path / name / LEGACY_FILE)
        except (ckpt_integrity.IntegrityError, OSError) as e:
            problems.append(str(e))
    return problems


def _iteration_from_common(path: Path) -> int | None:
    """``iteration`` of a foreign torch_dist checkpoint's common state, if safely loadable."""
    try:
        common = ckpt_common.read_common_state(path)
    except (ckpt_common.CommonStateError, ckpt_integrity.IntegrityError):
        return None  # unreadable or needs unsafe pickles: the iteration stays unknown
    value = common.get("iteration") if isinstance(common, dict) else None
    return int(value) if isinstance(value, int) else None


def order_inputs(inputs: list[CheckpointInput]) -> tuple[list[CheckpointInput], list[str]]:
    """Inputs oldest first, with notes; refuses duplicates.

    When every input's iteration is known they are sorted by it (coefficient c_0 belongs to the
    oldest); otherwise the given order is kept and said to be assumed.
    """
    notes: list[str] = []
    seen: set[Path] = set()
    for inp in inputs:
        real = inp.path.resolve()
        if real in seen:
            raise MergeError(f"{inp.path} is given twice")
        seen.add(real)
    iterations = [inp.iteration for inp in inputs]
    if all(it is not None for it in iterations):
        if len(set(iterations)) != len(iterations):
            dup = sorted({it for it in iterations if iterations.count(it) > 1})
            raise MergeError(f"several inputs are at the same iteration {dup}; give each once")
        ordered = sorted(inputs, key=lambda c: c.iteration)
        if ordered != inputs:
            notes.append("inputs reordered by iteration (oldest first)")
        return ordered, notes
    notes.append("iterations unknown for some inputs: the given order is taken as oldest first")
    return list(inputs), notes


#: Units of checkpoint positions (``--positions-from``): the iteration, the consumed tokens (both
#: from the manifests), or the index in the window (evenly spaced by assumption).
POSITION_UNITS = ("iteration", "tokens", "index")


def checkpoint_positions(
    inputs: list[CheckpointInput], unit: str
) -> tuple[list[int], str, list[str]]:
    """Positions of ordered ``inputs`` (oldest first) in ``unit``: (positions, unit used, notes).

    ``iteration`` uses each input's known iteration (manifest, else ``iter_N`` name or
    ``common.pt``: the one that ordered them); ``tokens`` the manifests' ``consumed_tokens``;
    ``index`` 0..k. When some input lacks the number, the index is used and a note says why.
    Positions that do not increase with the iteration order raise MergeError.
    """
    if unit not in POSITION_UNITS:
        raise MergeError(f"positions unit must be one of {POSITION_UNITS}, got {unit!r}")
    index = list(range(len(inputs)))
    if unit == "index":
        return index, unit, []
    if unit == "iteration":
        values = [inp.iteration for inp in inputs]
        missing = [inp.path for inp, v in zip(inputs, values) if v is None]
        why = "iteration unknown"
    else:
        values = [inp.manifest.consumed_tokens if inp.manifest else None for inp in inputs]
        missing = [inp.path for inp, v in zip(inputs, values) if v is None]
        why = "no manifest, so consumed tokens unknown"
    if missing:
        names = ", ".join(str(p) for p in missing)
        return index, "index", [
            f"--positions-from {unit}: {why} for {names}; coefficients computed by index "
            "(evenly spaced checkpoints assumed)"
        ]
    positions = [int(v) for v in values if v is not None]
    for a, b, inp in zip(positions, positions[1:], inputs[1:]):
        if b <= a:
            raise MergeError(
                f"--positions-from {unit}: {inp.path} is at {unit} {b}, not after the previous "
                f"input's {a}; check the manifests or use --positions-from index"
            )
    return positions, unit, []


_LAYOUT_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
)


def check_compatible(inputs: list[CheckpointInput]) -> list[str]:
    """Refuse inputs that cannot be merged shard by shard; returns notes.

    Same format; same model config hash and same model-parallel layout (TP/PP/EP/CP) where
    manifests tell. Data-parallel size may differ: it does not change the model's shards.
    """
    notes: list[str] = []
    formats = {inp.format for inp in inputs}
    if len(formats) > 1:
        raise MergeError(f"inputs mix checkpoint formats {sorted(formats)}")
    with_manifest = [inp for inp in inputs if inp.manifest is not None]
    if len(with_manifest) != len(inputs):
        notes.append(
            f"{len(inputs) - len(with_manifest)} input(s) have no manifest: checked through "
            "their torch_dist metadata only"
        )
    if not with_manifest:
        return notes
    ref = with_manifest[-1]
    for inp in with_manifest:
        m, r = inp.manifest, ref.manifest
        assert m is not None and r is not None
        if m.model_config_hash != r.model_config_hash:
            raise MergeError(
                f"{inp.path} has model config {m.model_config_hash or '?'} but {ref.path} has "
                f"{r.model_config_hash or '?'}: different models cannot be merged"
            )
        for field in _LAYOUT_FIELDS:
            a, b = getattr(m.parallel, field), getattr(r.parallel, field)
            if a != b:
                raise MergeError(
                    f"{inp.path} was saved with {field}={a} but {ref.path} with {b}: merge needs "
                    "one parallel layout (reshard on load instead)"
                )
        if m.checkpoint_format != r.checkpoint_format:
            raise MergeError(
                f"{inp.path} is {m.checkpoint_format} but {ref.path} is {r.checkpoint_format}"
            )
    if len({inp.manifest.parallel.data_parallel_size for inp in with_manifest}) > 1:
        notes.append("inputs differ in data-parallel size only (model shards are the same)")
    return notes


# ----------------------------------------------------------------------------- --load-dir


@dataclasses.dataclass
class WindowSelection:
    """The checkpoints :func:`choose_window` picked, oldest first, and the unfinished ones it
    skipped inside their range (only with ``skip_incomplete``)."""

    paths: list[Path]
    iterations: list[int]
    #: (path, iteration, reason) of unfinished checkpoints inside the window, left out.
    skipped: list[tuple[Path, int, str]]


def select_window(
    load_dir: str | os.PathLike,
    *,
    window_iters: int | None = None,
    window_tokens: int | None = None,
    count: int | None = None,
    skip_incomplete: bool = False,
) -> list[Path]:
    """The newest merge window under ``load_dir``, oldest first (:func:`choose_window`)."""
    return choose_window(
        load_dir,
        window_iters=window_iters,
        window_tokens=window_tokens,
        count=count,
        skip_incomplete=skip_incomplete,
    ).paths


def choose_window(
    load_dir: str | os.PathLike,
    *,
    window_iters: int | None = None,
    window_tokens: int | None = None,
    count: int | None = None,
    skip_incomplete: bool = False,
) -> WindowSelection:
    """The newest merge window under ``load_dir``, oldest first, from the manifests.

    ``window_iters=N`` keeps checkpoints with ``iteration >= newest - N`` (so a window of N
    iterations saved every I iterations has N/I + 1 checkpoints: the oldest one anchors it),
    ``window_tokens`` the same in consumed tokens; ``count=K`` keeps the newest K of those.
    One checkpoint per iteration (a window one preferred over a full one).

    Refused (MergeError): a corrupt checkpoint in or after the window, and an unfinished one
    (``complete: false``, no manifest, ``.tmp-iter_N``) inside its iteration range — from
    ``newest - N`` with ``window_iters`` alone, else from the oldest selected — since merging
    around it leaves a gap. With ``skip_incomplete`` unfinished ones are left out and listed
    in ``skipped`` instead: only right when the coefficients follow the checkpoints' real
    positions (iterations or tokens), which see the gap.
    """
    if not Path(load_dir).is_dir():
        raise MergeError(f"--load-dir {load_dir}: no such directory")
    scan = layout.scan_root(Path(load_dir))
    by_iteration: dict[int, tuple[Path, CheckpointManifest]] = {}
    for path, manifest in scan.complete:
        by_iteration.setdefault(manifest.iteration, (path, manifest))
    entries = [by_iteration[it] for it in sorted(by_iteration)]
    if not entries:
        refused = "".join(
            f"; refused: {path} ({why})" for path, _, why in scan.unreadable[:3]
        ) + "".join(f"; not complete: {path} ({why})" for path, _, why in scan.incomplete[-3:])
        raise MergeError(
            f"--load-dir {load_dir}: no complete window or full checkpoint found{refused}"
        )
    newest = entries[-1][1]
    # The trainer's retention keeps exactly these (checkpoint.layout.window_to_prune): one rule.
    entries = [
        (path, m)
        for path, m in entries
        if layout.in_window(
            m.iteration, m.consumed_tokens, newest.iteration, newest.consumed_tokens,
            window_iters, window_tokens,
        )
    ]
    if count is not None:
        if count < 2:
            raise MergeError(f"--count {count}: a merge needs at least 2 checkpoints")
        entries = entries[-count:]
    oldest = entries[0][1].iteration if entries else newest.iteration
    # A corrupt checkpoint inside (or newer than) the window would silently leave a gap.
    bad = [
        f"{path} ({why})"
        for path, iteration, why in scan.unreadable
        if iteration is None or iteration >= oldest
    ]
    for path, _ in entries:
        # Files on disk only: a manifest promising torch_dist without them is refused later,
        # per input, with its own message (inspect_input).
        problems = layout.storage_problems(path)
        if problems:
            bad.append(f"{path} ({problems[0]})")
    if bad:
        raise MergeError(
            f"--load-dir {load_dir}: unreadable checkpoint(s) in the selected window: "
            f"{'; '.join(bad)}; repair or remove them, or pass --inputs explicitly"
        )
    gaps = _unfinished_inside(scan.incomplete, entries, newest.iteration, window_iters, count)
    if gaps and not skip_incomplete:
        listed = "; ".join(f"{path} (iteration {it}, {why})" for path, it, why in gaps)
        raise MergeError(
            f"--load-dir {load_dir}: unfinished checkpoint(s) inside the selected window: "
            f"{listed}; merging around them leaves a gap: let the save finish, remove them, or "
            "pass --skip-incomplete (with --positions-from iteration or tokens)"
        )
    if len(entries) < 2:
        raise MergeError(
            f"--load-dir {load_dir}: the selected window holds {len(entries)} checkpoint(s); a "
            "merge needs at least 2 (widen --window-iters/--window-tokens or raise --count)"
        )
    return WindowSelection(
        paths=[path for path, _ in entries],
        iterations=[manifest.iteration for _, manifest in entries],
        skipped=gaps,
    )


def _unfinished_inside(
    incomplete: list[tuple[Path, int, str]],
    entries: list[tuple[Path, CheckpointManifest]],
    newest: int,
    window_iters: int | None,
    count: int | None,
) -> list[tuple[Path, int, str]]:
    """Unfinished checkpoints in the window's iteration range at an iteration it lacks."""
    if not entries:
        return []
    chosen = {manifest.iteration for _, manifest in entries}
    low = entries[0][1].iteration
    if window_iters is not None and count is None:
        # The window the user asked for starts at newest - N, even if its anchor is unfinished.
        low = min(low, newest - window_iters)
    high = entries[-1][1].iteration
    # A save newer than the window (the trainer's current one) is no gap.
    return [g for g in incomplete if low <= g[1] <= high and g[1] not in chosen]
