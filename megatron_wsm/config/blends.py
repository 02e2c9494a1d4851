"""Megatron-LM's data-source flags → megatron-core blends, checked before anything starts.

Megatron-LM (``megatron/training/utils.py: get_blend_and_blend_per_split``) turns
``--data-path`` / ``--data-args-path`` into one ``blend`` (all splits cut from the same datasets by
``--split``) and ``--train/valid/test-data-path`` / ``--per-split-data-args-path`` into a
``blend_per_split``; megatron-core's ``BlendedMegatronDatasetBuilder`` does the rest. A blend is
``(prefixes, weights or None)``, read from a list of words with megatron-core's
``get_blend_from_list`` rules:

* ``P`` or ``P1 P2 …`` (prefixes only): one prefix, or several weighted by their sizes;
* ``W1 P1 W2 P2 …`` (weight, prefix pairs): the weights are normalized by megatron-core.

This module parses the same forms but refuses what megatron-core would misread or fail on later
(a weight without its prefix, weights mixed with bare prefixes, zero, negative or non-finite
weights, missing ``.bin``/``.idx`` files, a per-split file without its keys), each with a message
that names the flag or file. Paths are data: nothing is executed or unpickled (the per-split file
is JSON). Pure Python: importable by ``megatron_wsm.config`` without megatron-core.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from megatron_wsm.config.fields import ConfigError

#: ``(prefixes, weights)``; ``weights`` None: weighted by dataset size (megatron-core's meaning).
Blend = tuple[list[str], list[float] | None]

SPLITS = ("train", "valid", "test")

#: Larger data-args files are refused (a list of prefixes is text; this is far above any real one).
MAX_ARGS_FILE_BYTES = 64 << 20


class BlendError(ConfigError):
    """A data blend that megatron-core would misread or fail on."""


def _as_weight(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def parse_blend(words: Sequence[str], source: str) -> Blend:
    """A blend from Megatron-LM's word list (``--data-path`` after the shell split it).

    Args:
        words: prefixes, or weight/prefix pairs.
        source: what the words came from (a flag or file), for messages.

    Raises:
        BlendError: empty list, a weight without a prefix, weights mixed with bare prefixes,
            a weight that is not a finite positive number.
    """
    words = [w for w in (str(w).strip() for w in words) if w]
    if not words:
        raise BlendError(f"{source}: no dataset given")
    weights = [_as_weight(w) for w in words[0::2]]
    second = [_as_weight(w) for w in words[1::2]]
    if len(words) % 2 == 0 and all(w is not None for w in weights):
        if any(w is not None for w in second):
            raise BlendError(
                f"{source}: {' '.join(words)!r}: expected weight/prefix pairs, but a prefix "
                "position holds a number"
            )
        for word, weight in zip(words[0::2], weights, strict=True):
            assert weight is not None
            if not math.isfinite(weight) or weight <= 0:
                raise BlendError(
                    f"{source}: weight {word!r} must be a finite positive number (megatron-core "
                    "normalizes the weights; a zero or negative one has no meaning)"
                )
        return words[1::2], [float(w) for w in weights if w is not None]
    numeric = [w for w in words if _as_weight(w) is not None and not _has_files(w)]
    if numeric:
        raise BlendError(
            f"{source}: {' '.join(words)!r}: give either prefixes only or weight/prefix pairs "
            f"({len(words)} entries; {numeric[0]!r} reads as a weight without its prefix, and "
            "no dataset of that name exists)"
        )
    return words, None


def _has_files(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def check_prefixes(blend: Blend, source: str) -> None:
    """Every prefix of ``blend`` names an indexed dataset (``.bin`` and ``.idx`` files)."""
    missing = [p for p in blend[0] if not _has_files(p)]
    if missing:
        shown = ", ".join(f"{p}.bin / {p}.idx" for p in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise BlendError(f"{source}: indexed dataset not found: {shown}{more}")


def _read_text(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise BlendError(f"{flag} {path}: file not found")
    if os.path.getsize(path) > MAX_ARGS_FILE_BYTES:
        raise BlendError(f"{flag} {path}: larger than {MAX_ARGS_FILE_BYTES} bytes; not a data list")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise BlendError(f"{flag} {path}: not UTF-8 text ({e.reason})") from None


def read_data_args(path: str) -> list[str]:
    """The words of a ``--data-args-path`` file (whitespace-separated, as Megatron-LM reads it)."""
    return _read_text(path, "--data-args-path").split()


def read_per_split_data_args(path: str) -> list[list[str] | None]:
    """The train/valid/test word lists of a ``--per-split-data-args-path`` JSON file.

    Megatron-LM reads ``{"train": …, "valid": …, "test": …}``, each value a list of words or one
    string of them (split on whitespace); a JSON ``null`` leaves that split out.
    """
    flag = "--per-split-data-args-path"
    try:
        data = json.loads(_read_text(path, flag))
    except json.JSONDecodeError as e:
        raise BlendError(f"{flag} {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise BlendError(f"{flag} {path}: expected a JSON object with keys {', '.join(SPLITS)}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise BlendError(
            f"{flag} {path}: missing key(s) {', '.join(missing)} (Megatron-LM reads all three; "
            "use null to leave a split out)"
        )
    out: list[list[str] | None] = []
    for split in SPLITS:
        value: Any = data[split]
        if value is None:
            out.append(None)
        elif isinstance(value, str):
            out.append(value.split())
        elif isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            out.append([str(v) for v in value])
        else:
            raise BlendError(
                f"{flag} {path}: {split!r} must be a string or a list of words, got "
                f"{type(value).__name__}"
            )
    return out


def blends_from_flags(data: Any) -> tuple[Blend | None, list[Blend | None] | None]:
    """``(blend, blend_per_split)`` of a :class:`~megatron_wsm.config.DataConfig`, as
    Megatron-LM's ``get_blend_and_blend_per_split`` builds them, every prefix checked.

    Both are None for the built-in corpus and for ``--mock-data``.
    """
    if data.data_path is not None or data.data_args_path is not None:
        if data.data_args_path is not None:
            source = f"--data-args-path {data.data_args_path}"
            words = read_data_args(data.data_args_path)
        else:
            source, words = "--data-path", data.data_path
        blend = parse_blend(words, source)
        check_prefixes(blend, source)
        return blend, None
    per_split_flags = (data.train_data_path, data.valid_data_path, data.test_data_path)
    if data.per_split_data_args_path is not None:
        lists = read_per_split_data_args(data.per_split_data_args_path)
        sources = [f"{data.per_split_data_args_path} [{s!r}]" for s in SPLITS]
    elif any(v is not None for v in per_split_flags):
        lists = list(per_split_flags)
        sources = [f"--{s}-data-path" for s in SPLITS]
    else:
        return None, None
    per_split: list[Blend | None] = []
    for words, source in zip(lists, sources, strict=True):
        if words is None:
            per_split.append(None)
            continue
        blend = parse_blend(words, source)
        check_prefixes(blend, source)
        per_split.append(blend)
    if per_split[0] is None:
        raise BlendError(f"{sources[0]}: a training dataset is required")
    return None, per_split


def megatron_num_samples(
    train_iters: int,
    global_batch_size: int,
    eval_interval: int,
    eval_iters: int,
) -> tuple[int, int | None, int | None]:
    """Samples per split that Megatron-LM requests (``get_train_valid_test_num_samples``).

    Train: ``train_iters × global batch``. Valid: one ``eval_iters`` batch set per evaluation,
    ``(train_iters // eval_interval + 1) × eval_iters × global batch``. Test: ``eval_iters ×
    global batch``. The blend indices depend on these sizes, so the same sizes give
    Megatron-LM's sample order. Our ``--eval-interval 0`` (no periodic evaluation) counts the
    final evaluation only; ``--eval-iters 0`` (the whole split, like Megatron-LM's
    ``--full-validation``) gives None: one pass. ``--eval-only`` keeps the training run's counts
    (Megatron-LM's ``--skip-train`` asks ``eval_iters`` batches only), so ``tools/evaluate.py``
    reads the validation samples the training run evaluated on.
    """
    train = max(train_iters, 1) * global_batch_size
    if eval_iters <= 0:
        return train, None, None
    evaluations = (train_iters // eval_interval if eval_interval > 0 else 0) + 1
    return train, evaluations * eval_iters * global_batch_size, eval_iters * global_batch_size
