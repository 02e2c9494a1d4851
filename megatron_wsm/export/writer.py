"""Write a Hugging Face model directory atomically: safetensors shards, index, configs.

Everything is written into a hidden temporary directory next to ``--save`` and renamed into
place as the last step, so a killed export never leaves a directory at ``--save`` (let alone one
that looks complete); leftovers of killed exports are hidden ``.<save>.exporting-<host>-<pid>``
directories that the next export into the same ``--save`` removes once their process is gone.
Where ``--save`` may be and what ``--overwrite`` may replace is the rule of
:mod:`megatron_wsm.checkpoint.publish`, shared with the merge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.checkpoint import publish
from megatron_wsm.export.mapping import ExportError, TensorSpec

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
#: Temporary directories are ``.<save>.exporting-<host>-<pid>``
#: (see :mod:`megatron_wsm.checkpoint.publish`).
TMP_TAG = "exporting"
#: The export's provenance file, which also marks a directory as an export.
MARKER_NAME = "wsm_export.json"
EXPORT_FORMAT = "megatron-wsm-hf-export"
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


def clean_stale(save: Path) -> list[Path]:
    """Remove leftovers of killed exports into ``save`` (dead processes of this host only: a
    concurrent export's temporary directory is never touched); returns what was removed."""
    return publish.remove_all(publish.stale_temp_dirs(save.parent, save.name, TMP_TAG))


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


def _export_marker(data: dict[str, Any]) -> str | None:
    if data.get("format") != EXPORT_FORMAT:
        return f"has a {MARKER_NAME} that is not an export's"
    return None


#: What an export writes (the marker is its provenance file): the one rule of
#: :mod:`megatron_wsm.checkpoint.publish` decides what ``--overwrite`` may replace.
EXPORT_OUTPUT = publish.OutputKind(
    tool="the export",
    what="a Hugging Face export",
    marker=MARKER_NAME,
    marker_ok=publish.json_marker(_export_marker),
    files=(
        INDEX_NAME,
        SINGLE_NAME,
        "config.json",
        "generation_config.json",
        "README.md",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        # what save_pretrained may add for a --tokenizer-type tokenizer
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
    ),
    patterns=(r"model-\d{5}-of-\d{5}\.safetensors",),
)


def check_save(save: Path, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse (ExportError, nothing written) a ``--save`` the export must not create or
    replace: see :func:`megatron_wsm.checkpoint.publish.output_refusal`."""
    why = publish.output_refusal(Path(save), EXPORT_OUTPUT, overwrite, inputs=inputs)
    if why:
        raise ExportError(why)


def _refuse(message: str) -> None:
    raise ExportError(message)


def publish_export(
    save: Path,
    overwrite: bool,
    fill: Callable[[Path], None],
    inputs: Sequence[str | os.PathLike] = (),
) -> None:
    """Create ``save`` atomically: ``fill`` a private temporary sibling directory, then rename
    it into place (modes following the umask).

    An existing ``save`` is refused unless ``overwrite`` and it is an export (checked before
    ``fill`` and again before the rename); it is replaced only after the new one is complete.
    """
    save = Path(save)
    check_save(save, overwrite, inputs)
    clean_stale(save)
    tmp = publish.make_temp_dir(save, TMP_TAG)
    try:
        fill(tmp)
        fsync_tree(tmp)
        publish.publish_dir(tmp, save, EXPORT_OUTPUT, overwrite, refuse=_refuse)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
