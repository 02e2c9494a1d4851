"""The files of one torch_dist checkpoint: are they usable, and if not, why (no listing, no
window rules: ``layout`` builds on this, and so does ``megatron_lm``, which ``layout`` uses)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.manifest import MANIFEST_NAME, CheckpointManifest

#: Files of a checkpoint that tools read; each must be a regular file (no FIFO, symlink...).
CHECKPOINT_FILES = (
    ckpt_integrity.METADATA_FILE,
    "metadata.json",
    ckpt_common.COMMON_FILE,
    MANIFEST_NAME,
)

def is_torch_dist(path: Path, manifest: CheckpointManifest | None = None) -> bool:
    """True when ``path`` holds (or, by its manifest, should hold) torch_dist shards."""
    if os.path.lexists(path / ckpt_integrity.METADATA_FILE) or any(path.glob("*.distcp")):
        return True
    return manifest is not None and manifest.checkpoint_format == "torch_dist"


def file_type_problems(path: Path) -> list[str]:
    """Checkpoint files of ``path`` (:data:`CHECKPOINT_FILES`, ``*.distcp``) that are not
    regular files: a FIFO would block a reader (megatron-core's too) forever, a symlink may
    point outside the checkpoint. One ``lstat`` per entry, nothing opened."""
    problems = []
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return [f"{path}: cannot list the directory ({e.strerror or e})"]
    for name in names:
        if name in CHECKPOINT_FILES or name.endswith(ckpt_integrity.SHARD_SUFFIX):
            try:
                ckpt_integrity.regular_size(path / name)
            except ckpt_integrity.IntegrityError as e:
                problems.append(str(e))
            except OSError:
                continue  # removed meanwhile: the checks that need it say so
    return problems


def storage_problems(path: Path, manifest: CheckpointManifest | None = None) -> list[str]:
    """Why a torch_dist checkpoint's files are not usable: a checkpoint file that is not a
    regular file (:func:`file_type_problems`), a ``.metadata`` that does not load, shards that
    do not hold what it names (missing or short), or no common state (neither ``common.pt``
    nor an embedded one). Empty when usable or not torch_dist. Nothing but ``.metadata`` is
    read (one ``lstat`` per file), cheap enough for every listing."""
    return checked_metadata(path, manifest)[1]


def checked_metadata(
    path: Path, manifest: CheckpointManifest | None = None
) -> tuple[Any | None, list[str]]:
    """:func:`storage_problems` and the ``.metadata`` it loaded (None when it loaded none: not
    torch_dist, or a problem before), for callers that go on to read the metadata."""
    if not is_torch_dist(path, manifest):
        return None, []
    problems = file_type_problems(path)
    if problems:
        return None, problems
    try:
        metadata = ckpt_integrity.load_metadata(path)
    except ckpt_integrity.IntegrityError as e:
        return None, [str(e)]
    problems = ckpt_integrity.storage_problems(path, metadata)
    missing = ckpt_common.common_state_missing(path, metadata)
    return metadata, problems + ([missing] if missing else [])
