"""Tokenizer worker processes for :mod:`megatron_wsm.data.indexed` (multi-process encoding).

Kept free of torch/megatron-core imports on purpose: ``spawn`` workers import this module, and
importing megatron-core costs seconds per worker. Workers use the bare SentencePiece processor,
which encodes exactly like :class:`megatron_wsm.data.tokenizer.SentencePieceTokenizer`.
"""

from __future__ import annotations

import sentencepiece as spm

_PROCESSOR: spm.SentencePieceProcessor | None = None


def init_worker(model_path: str) -> None:
    """Pool initializer: load the SentencePiece model once per worker."""
    global _PROCESSOR
    _PROCESSOR = spm.SentencePieceProcessor(model_file=model_path)


def encode(text: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and its UTF-8 size (runs in a worker)."""
    assert _PROCESSOR is not None, "init_worker was not called"
    return _PROCESSOR.encode(text, out_type=int), len(text.encode("utf-8"))
