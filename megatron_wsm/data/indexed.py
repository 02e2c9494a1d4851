"""Tokenize documents into megatron-core indexed datasets (``.bin`` + ``.idx``).

One document of text becomes one document (a single sequence) of the indexed dataset, optionally
followed by the tokenizer's end-of-document id. Token ids are stored with
``DType.optimal_dtype(vocab_size)`` (uint16 below 65 500 pieces, int32 above), as Megatron-LM's
``preprocess_data.py`` does. Files are written under temporary names and renamed at the end, the
``.bin`` before the ``.idx``: a new prefix whose ``.idx`` exists is complete, and a failed run
leaves nothing (overwriting an existing pair is not atomic across the two renames).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_wsm.data.workers import encode, init_worker

if TYPE_CHECKING:
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer


@dataclasses.dataclass
class IndexedStats:
    """What was written to one indexed dataset."""

    prefix: str
    documents: int = 0  #: documents written (empty documents are skipped)
    empty_documents: int = 0  #: input documents that produced no token and were skipped
    tokens: int = 0  #: token ids written, EOD included
    text_bytes: int = 0  #: UTF-8 bytes of the input text of written documents


def _encode_all(
    texts: Iterable[str], tokenizer: SentencePieceTokenizer, workers: int
) -> Iterator[tuple[list[int], int]]:
    """(token ids, text bytes) per text, in input order."""
    if workers <= 1:
        for text in texts:
            yield tokenizer.tokenize(text), len(text.encode("utf-8"))
        return
    # "spawn" is safe in processes that already hold threads (torch, tqdm monitor); ordered imap
    # keeps the output identical to the single-process path.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(tokenizer.model_path,)) as pool:
        yield from pool.imap(encode, texts, chunksize=16)


def write_indexed_dataset(
    texts: Iterable[str],
    tokenizer: SentencePieceTokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    append_eod: bool = True,
    workers: int = 1,
    on_document: Callable[[int], None] | None = None,
) -> IndexedStats:
    """Tokenize ``texts`` (one document each) into ``<output_prefix>.bin/.idx``.

    Args:
        texts: document texts, in the order they are to be stored.
        tokenizer: the tokenizer (its ``eod`` is appended when ``append_eod``).
        output_prefix: path prefix of the two output files; parent directories are created.
        append_eod: append the end-of-document id after every document (needed for GPT
            pretraining so the model sees document boundaries).
        workers: tokenizer processes (1 = in-process).
        on_document: called with the document's UTF-8 size after each input document (progress).

    Returns:
        Counts of what was written. Documents that tokenize to nothing are skipped (an empty
        document cannot be sampled and only confuses the split by document).
    """
    prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    stats = IndexedStats(prefix=prefix)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    try:
        for ids, n_bytes in _encode_all(texts, tokenizer, workers):
            if on_document is not None:
                on_document(n_bytes)
            if not ids:
                stats.empty_documents += 1
                continue
            if append_eod:
                ids.append(tokenizer.eod)
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
            builder.end_document()
            stats.documents += 1
            stats.tokens += len(ids)
            stats.text_bytes += n_bytes
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        raise
    return stats
