"""Records → megatron-core ``.bin``/``.idx``, byte for byte as Megatron-LM's
``tools/preprocess_data.py`` (core_v0.16.1) writes them for the same input and tokenizer.

What Megatron-LM does, and so this module (``Encoder.encode`` / ``process_json_file`` there):

* one JSON object per line is one document per ``--json-keys`` key, one dataset per key;
* a key's value is one sentence, or a list of sentences (each tokenized on its own; a sentence
  with no token is dropped); each kept sentence is one sequence of the document, with
  ``--append-eod`` adding the EOD id to the document's last sequence;
* a document with no token at all is still written, as a document of zero sequences (so
  document indices stay aligned with the input lines);
* ids are stored with ``DType.optimal_dtype(tokenizer.vocab_size)`` (uint16 below 65 500).

Differences, on purpose: every key's ``.idx`` is written (Megatron-LM 0.16 finalizes only the
last key's); blank lines are skipped (Megatron-LM stops with a JSON error); files are written
under temporary names and renamed at the end, ``.bin`` before ``.idx``, so a failed run leaves
nothing behind. Plain-text inputs (not Megatron-LM's) are :class:`Record` s of one text.

Worker processes (``workers > 1``) are ``spawn``-ed, each building the tokenizer from the same
arguments; ``imap`` keeps the input order, so the output does not depend on ``workers``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_wsm.data.tokenizers import build_tokenizer

#: One input record: key → text, or key → list of sentences (JSON lists).
Record = dict[str, Any]


class RecordError(ValueError):
    """An input record cannot be tokenized (missing key, not text, bad JSON)."""


@dataclasses.dataclass
class KeyStats:
    """What was written to one key's dataset."""

    prefix: str
    documents: int = 0  #: documents written, empty ones included
    empty_documents: int = 0  #: documents without any token (written with zero sequences)
    tokens: int = 0  #: token ids written, EOD included
    text_bytes: int = 0  #: UTF-8 bytes of the key's text in the input


def encode_record(
    record: Record, keys: Sequence[str], tokenizer: Any, append_eod: bool
) -> dict[str, tuple[list[int], list[int], int]]:
    """Per key: (token ids, sequence lengths, text bytes) of one record, as Megatron-LM's
    ``Encoder.encode`` makes them."""
    out: dict[str, tuple[list[int], list[int], int]] = {}
    for key in keys:
        if key not in record:
            raise RecordError(f"no key {key!r} in the JSON object")
        value = record[key]
        sentences = value if isinstance(value, list) else [value]
        if not all(isinstance(s, str) for s in sentences):
            raise RecordError(f"key {key!r}: a string or a list of strings is needed")
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in sentences:
            try:
                sentence_ids = list(tokenizer.tokenize(sentence))
            except (ValueError, TypeError) as err:  # e.g. NullTokenizer given words
                raise RecordError(f"key {key!r}: the tokenizer failed: {err}") from None
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if ids and append_eod:
            ids.append(int(tokenizer.eod))
            lengths[-1] += 1
        n_bytes = sum(len(s.encode("utf-8")) for s in sentences)
        out[key] = (ids, lengths, n_bytes)
    return out


# -- worker processes ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_args: dict[str, Any], keys: Sequence[str], append_eod: bool) -> None:
    _WORKER.update(
        tokenizer=build_tokenizer(**tokenizer_args), keys=list(keys), append_eod=append_eod
    )


def _encode_in_worker(item: tuple[str, Record]) -> tuple[str, Any]:
    where, record = item
    try:
        return where, encode_record(
            record, _WORKER["keys"], _WORKER["tokenizer"], _WORKER["append_eod"]
        )
    except RecordError as err:
        return where, err


def _encoded(
    records: Iterable[tuple[str, Record]],
    tokenizer: Any,
    tokenizer_args: dict[str, Any],
    keys: Sequence[str],
    append_eod: bool,
    workers: int,
) -> Iterator[tuple[str, Any]]:
    if workers <= 1:
        for where, record in records:
            try:
                yield where, encode_record(record, keys, tokenizer, append_eod)
            except RecordError as err:
                yield where, err
        return
    ctx = multiprocessing.get_context("spawn")
    initargs = (tokenizer_args, list(keys), append_eod)
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap(_encode_in_worker, records, chunksize=32)


def write_datasets(
    records: Iterable[tuple[str, Record]],
    tokenizer: Any,
    prefixes: dict[str, str],
    *,
    append_eod: bool,
    keep_empty: bool = True,
    workers: int = 1,
    tokenizer_args: dict[str, Any] | None = None,
    on_record: Callable[[], None] | None = None,
) -> dict[str, KeyStats]:
    """Tokenize ``records`` into one ``<prefix>.bin/.idx`` per key of ``prefixes``.

    Args:
        records: (where, record) pairs in output order; ``where`` names the input line in errors.
        tokenizer: the tokenizer (``tokenize``, ``eod``, ``vocab_size``).
        prefixes: key → output prefix; parent directories are created.
        append_eod: end every non-empty document with the EOD id (``--append-eod``).
        keep_empty: write documents without tokens as empty documents (Megatron-LM's JSON
            behaviour); False skips them (plain-text inputs).
        workers: tokenizer processes (1 = in-process); needs ``tokenizer_args``.
        tokenizer_args: keyword arguments of :func:`build_tokenizer` that rebuild ``tokenizer``
            in a worker.
        on_record: called after each record (progress).

    Raises:
        RecordError: a record lacks a key or has no text (nothing is left behind).
    """
    if workers > 1 and tokenizer_args is None:
        raise ValueError("workers > 1 needs tokenizer_args")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = {key: KeyStats(prefix=prefix) for key, prefix in prefixes.items()}
    tmp = {
        key: (
            f"{get_bin_path(prefix)}.tmp-{os.getpid()}",
            f"{get_idx_path(prefix)}.tmp-{os.getpid()}",
        )
        for key, prefix in prefixes.items()
    }
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        for key, prefix in prefixes.items():
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            builders[key] = IndexedDatasetBuilder(tmp[key][0], dtype=dtype)
        encoded = _encoded(records, tokenizer, tokenizer_args or {}, list(prefixes), append_eod,
                           workers)  # fmt: skip
        for where, result in encoded:
            if isinstance(result, RecordError):
                raise RecordError(f"{where}: {result}")
            for key, (ids, lengths, n_bytes) in result.items():
                s = stats[key]
                s.text_bytes += n_bytes
                if not ids:
                    s.empty_documents += 1
                    if not keep_empty:
                        continue
                builders[key].add_document(ids, lengths)  # a list, as Megatron-LM passes it
                s.documents += 1
                s.tokens += len(ids)
            if on_record is not None:
                on_record()
        for key in prefixes:
            builders[key].finalize(tmp[key][1])
        for key, prefix in prefixes.items():
            os.replace(tmp[key][0], get_bin_path(prefix))
            os.replace(tmp[key][1], get_idx_path(prefix))
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        for paths in tmp.values():
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
        raise
    return stats


def json_records(paths: Sequence[str]) -> Iterator[tuple[str, Record]]:
    """(``path:line``, object) of each non-blank line of JSON-lines files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}:{lineno}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise RecordError(f"{path}:{lineno}: a JSON object is needed")
                yield f"{path}:{lineno}", record
