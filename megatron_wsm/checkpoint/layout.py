"""Checkpoint layout on disk: names, listing, completeness and the window rule.

The one owner of these rules: the trainer (saving, retention, ``--load``), the merge
(``--load-dir`` window selection) and ``tools/list_checkpoints.py`` all call this module, so
the checkpoints the trainer keeps are exactly the ones the merge selects. Layout under a
checkpoint root (``--save`` for full ones, ``--wsm-save`` for window ones)::

    iter_0000100/                  a finished checkpoint: torch_dist shards + wsm_manifest.json
    .tmp-iter_0000120/             a save in progress (or killed): never listed as complete
    latest_checkpointed_iteration.txt   (full root only; Megatron-LM's tracker file)

A checkpoint is *complete* when its manifest says so and its ``iter_N`` name agrees with the
manifest's iteration (a Megatron-LM checkpoint, which has no manifest of ours, when
:func:`.megatron_lm.recognise` finds it complete: consistent files, a readable common state at
its name's iteration, committed by its root's tracker; it then carries a manifest made from its
common state, which retention never acts on); where the files are torch_dist, its files must
be regular files, the shards must hold every byte range the ``.metadata`` names and a common
state must be there (:func:`storage_problems`); :func:`checkpoint_problems` also reads the
common state and checks its iteration. Checkpoint directories found by listing a root are
never symlinks (see :data:`SYMLINK_REFUSED`): a link can bring another run's checkpoint into a
window, and retention cannot delete it. Nothing here imports torch at import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.files import (  # noqa: F401  (their home before; re-exported)
    CHECKPOINT_FILES,
    file_type_problems,
    is_torch_dist,
    storage_problems,
)
from megatron_wsm.checkpoint.manifest import (
    KIND_FULL,
    KIND_WINDOW,
    MANIFEST_NAME,
    CheckpointManifest,
    read_manifest,
)

#: Megatron-LM's tracker file in a full-checkpoint root: the newest iteration saved.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: Prefix of a save in progress (or interrupted): ``.tmp-iter_0000120``.
TMP_PREFIX = ".tmp-"
#: Files that mark a directory as one checkpoint (torch_dist, Megatron's ``metadata.json``).
DIST_METADATA_FILES = (ckpt_integrity.METADATA_FILE, "metadata.json")
# Our names: iter_ and at least 7 digits, optionally behind the in-progress prefix.
_NAME_RE = re.compile(rf"^(?:{re.escape(TMP_PREFIX)})?iter_(\d{{7,}})$")
# Names written by other tools: anything ending in iter_<digits>.
_FOREIGN_NAME_RE = re.compile(r"iter_(\d+)$")

_IN_PROGRESS = "save in progress or interrupted"
#: Why a symlinked checkpoint directory found under a root is refused.
SYMLINK_REFUSED = (
    "a symlink: checkpoints found under a root must be real directories (a link can bring "
    "another run's checkpoint into the window); copy it, or name it explicitly"
)
_NO_MANIFEST = "no manifest (incomplete or not written by megatron-wsm)"


# ----------------------------------------------------------------------------- names


def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint taken after ``iteration``."""
    return f"iter_{iteration:07d}"


def parse_name(name: str) -> tuple[int, bool] | None:
    """(iteration, in progress) of one of our checkpoint directory names, else None."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), name.startswith(TMP_PREFIX)


def iteration_in_name(name: str) -> int | None:
    """The iteration a directory name states, for checkpoints of other tools too
    (``..._iter_12``); None when it states none."""
    match = _FOREIGN_NAME_RE.search(name)
    return int(match.group(1)) if match else None


def has_dist_metadata(path: Path) -> bool:
    """True when ``path`` holds a distributed checkpoint's metadata file (it *is* a checkpoint,
    not a root holding ``iter_*`` ones)."""
    return any(os.path.lexists(path / name) for name in DIST_METADATA_FILES)


def is_checkpoint_dir(path: Path) -> bool:
    """True when ``path`` itself is a checkpoint: torch_dist metadata, Megatron's
    ``metadata.json`` or our manifest."""
    markers = (*DIST_METADATA_FILES, MANIFEST_NAME)
    return path.is_dir() and any(os.path.lexists(path / name) for name in markers)


def read_tracker(root: Path) -> int | None:
    """The iteration in ``root``'s tracker file; None when absent or not a number.

    Raises:
        ckpt_integrity.IntegrityError: the tracker is not a regular file (a FIFO, a symlink)
            or is too big to be one.
    """
    tracker = root / TRACKER_FILE
    if not os.path.lexists(tracker):
        return None
    data = ckpt_integrity.read_regular(tracker, ckpt_integrity.MAX_TRACKER_BYTES)
    text = data.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


def dir_bytes(path: Path) -> int:
    """Total size of the files below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- completeness


def name_problem(path: Path, manifest: CheckpointManifest | None) -> str | None:
    """Why ``path``'s name and its manifest disagree on the iteration (our ``iter_N`` names
    only; other names state nothing we check); None when they agree."""
    parsed = parse_name(path.name)
    if manifest is None or parsed is None or parsed[0] == manifest.iteration:
        return None
    return (
        f"{path.name} names iteration {parsed[0]} but its manifest says {manifest.iteration}: "
        "a renamed, copied or linked checkpoint of another iteration"
    )


def checkpoint_problems(
    path: Path, manifest: CheckpointManifest | None, *, crc: bool = False
) -> list[str]:
    """Every reason not to load or merge the checkpoint at ``path`` (empty: none): its name and
    manifest disagree on the iteration (:func:`name_problem`); for torch_dist files, every
    :func:`storage_problems` problem, then the common state read and checked
    (:func:`.common_state.common_state_problems`: readable, at the manifest's iteration, else the
    name's), and with ``crc`` the CRC-32 of all item data. Reads the common state (small); the
    CRC check reads every byte."""
    problem = name_problem(path, manifest)
    if problem:
        return [problem]
    if not is_torch_dist(path, manifest):
        return []
    problems = storage_problems(path, manifest)
    if problems:
        return problems
    try:
        metadata = ckpt_integrity.load_metadata(path)
    except ckpt_integrity.IntegrityError as e:  # replaced since storage_problems read it
        return [str(e)]
    parsed = parse_name(path.name)
    iteration = manifest.iteration if manifest else parsed[0] if parsed else None
    problems = ckpt_common.common_state_problems(path, metadata, iteration)
    if crc and not problems:
        problems = ckpt_integrity.crc_problems(path, metadata)
    return problems


# ----------------------------------------------------------------------------- listing


@dataclasses.dataclass
class CheckpointInfo:
    """One checkpoint directory as found on disk."""

    path: Path
    iteration: int
    manifest: CheckpointManifest | None
    error: str | None = None
    #: The manifest exists but cannot be read (corrupt), as opposed to missing.
    unreadable: bool = False

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.manifest.complete and self.error is None

    def size_bytes(self) -> int:
        return dir_bytes(self.path)


def read_checkpoint(path: Path, iteration: int | None = None) -> CheckpointInfo:
    """What ``path`` is: its manifest (or why there is none); an in-progress ``.tmp-``
    directory is never complete. ``iteration`` defaults to the manifest's, else that of our
    ``iter_N`` name (-1 when neither tells)."""
    manifest, error, unreadable = None, None, False
    if path.name.startswith(TMP_PREFIX):
        error = _IN_PROGRESS
    else:
        try:
            manifest = read_manifest(path)
            if manifest is None:
                manifest, error, unreadable = _megatron_lm_manifest(path)
        except ValueError as e:
            error, unreadable = str(e), True
        mismatch = name_problem(path, manifest)
        if mismatch:  # refused like a corrupt manifest: never complete, never merged
            manifest, error, unreadable = None, mismatch, True
    if iteration is None:
        parsed = parse_name(path.name)
        if manifest is not None:
            iteration = manifest.iteration
        else:
            iteration = parsed[0] if parsed is not None else -1
    return CheckpointInfo(path, iteration, manifest, error, unreadable)


def _megatron_lm_manifest(path: Path) -> tuple[CheckpointManifest | None, str | None, bool]:
    """(manifest, error, unreadable) of a directory without our manifest: a complete
    Megatron-LM checkpoint gets the manifest :mod:`.megatron_lm` builds from its common state
    (marked as such: never written, never pruned); an incomplete one the reason; anything
    else :data:`_NO_MANIFEST`."""
    from megatron_wsm.checkpoint import megatron_lm

    found = megatron_lm.recognise(path)
    if found is None:
        return None, _NO_MANIFEST, False
    if found.complete:
        return megatron_lm.synthesized_manifest(found), None, False
    return None, f"Megatron-LM checkpoint, not complete: {found.problems[0]}", found.unreadable


def _ours(info: CheckpointInfo) -> bool:
    """Written by megatron-wsm (our manifest on disk): retention may act on it."""
    from megatron_wsm.checkpoint.megatron_lm import is_synthesized

    return info.manifest is not None and not is_synthesized(info.manifest)


def list_checkpoints(
    root: str | os.PathLike, include_incomplete: bool = True
) -> list[CheckpointInfo]:
    """Checkpoints under ``root`` (``iter_*`` dirs and in-progress ``.tmp-iter_*`` ones), oldest
    first. Incomplete ones (no manifest, ``complete: false``, unreadable manifest, or a
    temporary dir) are listed only when ``include_incomplete``."""
    root = Path(root)
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        parsed = parse_name(child.name)
        if parsed is None or not child.is_dir():
            continue
        if child.is_symlink():
            info = CheckpointInfo(child, parsed[0], None, _symlink_refused(child), True)
        else:
            info = read_checkpoint(child, parsed[0])
        if info.complete or include_incomplete:
            found.append(info)
    found.sort(key=lambda c: (c.iteration, c.path.name))
    return found


def list_window(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete window checkpoints of ours under ``root``, oldest first (a Megatron-LM
    checkpoint without optimizer state reads as a window one but is never ours to prune)."""
    return [
        c
        for c in list_checkpoints(root, include_incomplete=False)
        if _ours(c) and c.manifest is not None and c.manifest.kind == KIND_WINDOW
    ]


@dataclasses.dataclass
class RootScan:
    """What :func:`scan_root` found under a checkpoint root."""

    #: Complete full/window checkpoints, oldest first (a window one first at equal iteration).
    complete: list[tuple[Path, CheckpointManifest]]
    #: (path, iteration from its name or None, reason): a corrupt manifest.
    unreadable: list[tuple[Path, int | None, str]]
    #: (path, iteration, reason): saves not finished — ``complete: false``, an ``iter_N``
    #: directory without manifest, or a ``.tmp-iter_N`` directory.
    incomplete: list[tuple[Path, int, str]]


def scan_root(root: Path) -> RootScan:
    """Complete, unreadable and unfinished checkpoints under ``root`` (one level deep, or two
    for a run directory holding separate full and window roots); directories of any name with
    a manifest count, so checkpoints copied or renamed by hand are found too.

    Unreadable and unfinished ones are reported, not dropped, so that a window containing one
    can be refused (or its gap stated) rather than used with a silent gap.
    """
    scan = RootScan([], [], [])
    children = [p for p in root.iterdir() if p.is_dir()]
    links = [p for p in children if p.is_symlink() and not p.name.startswith(".")]
    children = [p for p in children if not p.is_symlink()]
    candidates = [p for p in children if not p.name.startswith(".")]
    hidden = [p for p in children if p.name.startswith(TMP_PREFIX)]
    for parent in [p for p in candidates if not os.path.lexists(p / MANIFEST_NAME)]:
        for q in parent.iterdir():
            if not q.is_dir():
                continue
            if q.is_symlink():
                links.append(q)
            else:
                (hidden if q.name.startswith(TMP_PREFIX) else candidates).append(q)
    for link in links:
        if _holds_checkpoints(link):
            scan.unreadable.append((link, iteration_in_name(link.name), _symlink_refused(link)))
    for path in hidden:
        iteration = iteration_in_name(path.name)
        if iteration is not None:
            scan.incomplete.append((path, iteration, _IN_PROGRESS))
    for path in candidates:
        info = read_checkpoint(path)
        manifest, named = info.manifest, iteration_in_name(path.name)
        if info.unreadable:
            scan.unreadable.append((path, named, str(info.error).splitlines()[0]))
        elif manifest is None:
            if named is not None:
                why = info.error if info.error != _NO_MANIFEST else None
                scan.incomplete.append(
                    (path, named, why or f"no {MANIFEST_NAME}: save unfinished?")
                )
        elif manifest.kind in (KIND_WINDOW, KIND_FULL):
            if manifest.complete:
                scan.complete.append((path, manifest))
            else:
                scan.incomplete.append((path, manifest.iteration, "complete: false"))
    scan.complete.sort(key=lambda pm: (pm[1].iteration, pm[1].kind != KIND_WINDOW))
    scan.incomplete.sort(key=lambda entry: entry[1])
    return scan


def _symlink_refused(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"{SYMLINK_REFUSED} (-> {target})"


def _holds_checkpoints(path: Path) -> bool:
    """Whether a (symlinked) directory is a checkpoint or a root holding some (one listing)."""
    if parse_name(path.name) is not None or is_checkpoint_dir(path):
        return True
    try:
        return any(
            parse_name(q.name) is not None or os.path.lexists(q / MANIFEST_NAME)
            for q in path.iterdir()
        )
    except OSError:
        return False


def holds_no_checkpoint(path: str | os.PathLike, window_dir: str = "wsm_window") -> bool:
    """Megatron-LM's "no checkpoint found" for ``--load path`` (it then starts from random
    initialization): ``path`` does not exist, or is a directory holding no checkpoint of any
    kind — no tracker file, no ``iter_*`` directory (complete, incomplete or in progress), no
    checkpoint files of its own, no checkpoint under ``path/window_dir``. Anything else,
    however broken, is not "missing": the load refuses it rather than train over it."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    if os.path.lexists(path / TRACKER_FILE) or _holds_checkpoints(path):
        return False
    window = path / window_dir
    return not (os.path.lexists(window) and (window.is_symlink() or _holds_checkpoints(window)))


# ----------------------------------------------------------------------------- the window rule


def in_window(
    iteration: int,
    tokens: int,
    newest_iteration: int,
    newest_tokens: int,
    window_iters: int | None,
    window_tokens: int | None,
) -> bool:
    """The window rule: is the checkpoint at (``iteration``, ``tokens``) inside the trailing
    window ending at the newest one?

    Inside when ``iteration >= newest - window_iters`` and ``tokens >= newest_tokens -
    window_tokens`` (each only when given), so a window of ``k × interval`` holds the k + 1
    checkpoints a merge of k intervals needs: the oldest one anchors it. The newest is always
    inside; without a window size every checkpoint is. The trainer prunes what is outside
    (:func:`window_to_prune`); the merge selects what is inside.
    """
    if iteration >= newest_iteration:
        return True
    if window_iters is not None and iteration < newest_iteration - window_iters:
        return False
    return window_tokens is None or tokens >= newest_tokens - window_tokens


def window_to_prune(
    entries: Sequence[tuple[int, int]],
    newest_iteration: int,
    newest_tokens: int,
    window_iters: int | None,
    window_tokens: int | None,
) -> list[int]:
    """Iterations of window checkpoints outside the trailing window (:func:`in_window`).

    ``entries`` are (iteration, consumed_tokens) of *complete* window checkpoints.
    """
    return sorted(
        iteration
        for iteration, tokens in entries
        if not in_window(
            iteration, tokens, newest_iteration, newest_tokens, window_iters, window_tokens
        )
    )


def full_to_prune(iterations: list[int], keep_last: int | None) -> list[int]:
    """Iterations of complete full checkpoints beyond the newest ``keep_last`` (never newest)."""
    if keep_last is None:
        return []
    keep_last = max(1, keep_last)
    ordered = sorted(iterations)
    return ordered[:-keep_last] if len(ordered) > keep_last else []


def prune_window_dir(
    root: str | os.PathLike, window_iters: int | None, window_tokens: int | None
) -> list[Path]:
    """Delete complete window checkpoints of ours that fell out of the trailing window.

    Only directories with our manifest saying ``complete`` and ``kind: window`` are candidates;
    the newest complete one is never deleted; foreign or incomplete directories are left alone.
    """
    window = list_window(root)
    if not window:
        return []
    newest = window[-1].manifest
    assert newest is not None
    doomed = set(
        window_to_prune(
            [(c.iteration, c.manifest.consumed_tokens) for c in window if c.manifest],
            newest.iteration,
            newest.consumed_tokens,
            window_iters,
            window_tokens,
        )
    )
    return _remove([c for c in window[:-1] if c.iteration in doomed])


def prune_full_dir(root: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete complete full checkpoints of ours beyond the newest ``keep_last``."""
    full = [
        c
        for c in list_checkpoints(root, include_incomplete=False)
        if _ours(c) and c.manifest is not None and c.manifest.kind == KIND_FULL
    ]
    doomed = set(full_to_prune([c.iteration for c in full], keep_last))
    return _remove([c for c in full[:-1] if c.iteration in doomed])


def _remove(doomed: list[CheckpointInfo]) -> list[Path]:
    for c in doomed:
        shutil.rmtree(c.path)
    return [c.path for c in doomed]
