"""Deterministic SentencePiece training (no megatron-core import; see ``tokenizer.py``).

The settings and their reasons are documented in :mod:`megatron_wsm.data.tokenizer`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

#: SentencePiece skips training lines longer than this many bytes; we keep its default.
MAX_SENTENCE_LENGTH = 4192


def _training_lines(source: str | os.PathLike[str] | Iterable[str]) -> Iterator[str]:
    """Lines to train on: a file's lines, or the lines of every text of an iterable."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
        return
    for text in source:
        # SentencePiece trains on lines (newlines cannot occur inside a sentence); "\n" is added
        # back as a user-defined piece so encoded documents keep their line structure.
        yield from text.split("\n")


def train_sentencepiece(
    text_iter_or_file: str | os.PathLike[str] | Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = 4096,
    *,
    seed: int = 1234,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    model_type: str = "bpe",
    extra_options: dict[str, Any] | None = None,
) -> str:
    """Train a byte-fallback SentencePiece model and write ``<model_prefix>.model``/``.vocab``.

    Args:
        text_iter_or_file: a path to a UTF-8 text file (one training sentence per line), or an
            iterable of texts (documents; each is split on newlines).
        model_prefix: output prefix; parent directories are created.
        vocab_size: number of pieces including the 4 special pieces and the 256 byte pieces.
        seed: seed of SentencePiece's global random generator (sentence sampling).
        input_sentence_size: at most this many lines are used (sampled with ``seed`` beyond it).
        character_coverage: fraction of characters covered by single-character pieces; the rest
            fall back to bytes.
        model_type: ``"bpe"`` (default) or ``"unigram"``.
        extra_options: further ``SentencePieceTrainer`` options (override the defaults).

    Returns:
        The path of the written ``.model`` file. Both files are written atomically
        (temporary name + rename), so a killed run never leaves a truncated model.
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "byte_fallback": True,
        "character_coverage": character_coverage,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "user_defined_symbols": ["\n"],
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        # One thread: multi-threaded BPE training can break ties in a different order.
        "num_threads": 1,
        "input_sentence_size": input_sentence_size,
        "shuffle_input_sentence": True,
        "max_sentence_length": MAX_SENTENCE_LENGTH,
        "minloglevel": 2,  # SentencePiece logs every merge at INFO; keep the console readable
    }
    options.update(extra_options or {})
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(text_iter_or_file), model_writer=model, **options
    )
    model_bytes = model.getvalue()

    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab_lines = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    model_path = str(prefix) + ".model"
    _atomic_write(Path(model_path), model_bytes)
    _atomic_write(Path(str(prefix) + ".vocab"), vocab_lines.encode("utf-8"))
    return model_path


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
