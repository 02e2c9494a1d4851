"""Write a Hugging Face model directory atomically: safetensors shards, index, configs.

Everything is written into a hidden temporary directory next to ``--save`` and renamed into
place as the last step, so a killed export never leaves a directory at ``--save`` (let alone one
that looks complete); leftovers of killed exports are hidden ``.tmp-export-*`` directories that
the next export into the same parent removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.export.mapping import ExportError, TensorSpec

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
TMP_PREFIX = ".tmp-export-"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def parse_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹ bytes (``GiB`` etc. are powers of two, as in transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ExportError(f"--max-shard-size {text!r} must be at least one byte")
    return int(value)


def plan_shards(
    specs: Sequence[TensorSpec], nbytes: Callable[[TensorSpec], int], max_bytes: int
) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` gets a shard of its own (as transformers does).
    """
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        n = nbytes(spec)
        if not shards or (shards[-1] and size + n > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, transformers' convention."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_json(path: Path, data: Any) -> None:
    """JSON file with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_shards(
    out: Path,
    shards: Sequence[Sequence[TensorSpec]],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str],
) -> dict[str, Any] | None:
    """Write each shard as a safetensors file; return the index (None for a single file).

    Only one shard's tensors are alive at a time (plus what ``produce`` holds).
    """
    from safetensors.torch import save_file

    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        tensors = {}
        for spec in shard:
            t = produce(spec).contiguous()
            # A view into a bigger slice would save (and keep alive) the whole base storage.
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            tensors[spec.name] = t
            total += t.numel() * t.element_size()
            weight_map[spec.name] = name
        save_file(tensors, str(out / name), metadata=metadata)
        del tensors
    if len(shards) == 1:
        return None
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def clean_stale(parent: Path) -> list[Path]:
    """Remove leftovers of killed exports in ``parent``; returns what was removed."""
    removed = []
    for stale in parent.glob(TMP_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def fsync_tree(root: Path) -> None:
    """fsync every file of ``root`` and the directory itself (before the publishing rename)."""
    for path in sorted(root.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    save: Path, overwrite: bool, fill: Callable[[Path], None], keep: Iterable[str] = ()
) -> None:
    """Create ``save`` atomically: ``fill`` a temporary sibling directory, then rename it.

    An existing ``save`` is refused unless ``overwrite``; then it is replaced only after the new
    directory is complete.
    """
    save = Path(save)
    if save.exists() and not overwrite:
        raise ExportError(f"--save {save} exists (pass --overwrite to replace it)")
    parent = save.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{save.name}-", dir=parent))
    try:
        fill(tmp)
        fsync_tree(tmp)
        if save.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=parent))
            os.replace(save, old / "old")
            os.replace(tmp, save)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
