"""Tokenizer files of an export: our SentencePiece model, loadable by ``AutoTokenizer``, or a
``--tokenizer-type`` tokenizer (a Hugging Face directory, GPT-2 BPE) through the data layer's
``save_for_transformers``.

Our SentencePiece model never rewrites text (identity normalisation, no dummy prefix, byte
fallback, ``"\\n"`` as a piece), which transformers' generic SentencePiece→fast conversion does
not reproduce. The export therefore names the SentencePiece-backed ``LlamaTokenizer`` with
``legacy`` behaviour and no automatic bos/eos, so ``AutoTokenizer`` encodes exactly as our
trainer does; :func:`ids_match` is the check the tests and the exporter rely on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from megatron_wsm.export.mapping import ExportError

MODEL_NAME = "tokenizer.model"


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    """The SentencePiece model at ``path``; ExportError when it is missing or unreadable."""
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ExportError(f"tokenizer {path}: {e}") from e


def tokenizer_config(sp: spm.SentencePieceProcessor, max_length: int) -> dict:
    """``tokenizer_config.json`` for our SentencePiece model."""

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(pad),
        "model_max_length": max_length or 1_000_000,
    }


def write_tokenizer_files(out: Path, model_path: str, max_length: int) -> None:
    """Copy the SentencePiece model and write the configs ``AutoTokenizer`` reads."""
    sp = load_sentencepiece(model_path)
    shutil.copyfile(model_path, out / MODEL_NAME)
    config = tokenizer_config(sp, max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def ids_match(hf_tokenizer, sp: spm.SentencePieceProcessor, texts: Iterable[str]) -> list[str]:
    """Texts (shortened) that the HF tokenizer encodes differently from SentencePiece."""
    bad = []
    for text in texts:
        ours = sp.encode(text, out_type=int)
        theirs = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            bad.append(text[:60])
    return bad


@dataclasses.dataclass(frozen=True)
class ExportTokenizer:
    """The run's tokenizer as the export writes it: its ids and how to write its files."""

    source: str  #: where it came from (provenance)
    vocab_size: int  #: the unpadded vocabulary the model was trained with
    bos_id: int | None
    eos_id: int
    pad_id: int
    write: Callable[[Path], None]  #: writes the tokenizer files into the export directory


def sentencepiece_tokenizer(model_path: str, max_length: int) -> ExportTokenizer:
    """Our SentencePiece model (the trainer's default tokenizer)."""
    sp = load_sentencepiece(model_path)
    eos = sp.eos_id()
    return ExportTokenizer(
        source=str(model_path),
        vocab_size=sp.get_piece_size(),
        bos_id=sp.bos_id(),
        eos_id=eos,
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else eos,
        write=lambda out: write_tokenizer_files(out, model_path, max_length),
    )


def megatron_tokenizer(data: Any) -> ExportTokenizer:
    """A ``--tokenizer-type`` the trainer built through megatron-core's tokenizer library,
    rebuilt from the run's recorded flags (``data``: its ``DataConfig``) and written by
    :func:`megatron_wsm.data.tokenizers.save_for_transformers`, so ``AutoTokenizer`` encodes
    text to the trainer's ids. Other types are refused (:class:`ExportError`)."""
    from megatron_wsm.data import tokenizers

    kind = data.tokenizer_type
    if kind not in tokenizers.TRANSFORMERS_SAVABLE:
        raise ExportError(
            f"the run's --tokenizer-type {kind} is not written for transformers (the export "
            f"writes {', '.join(tokenizers.TRANSFORMERS_SAVABLE)} and sentencepiece .model "
            "tokenizers)"
        )
    try:
        built = tokenizers.tokenizer_from_config(data)
    except tokenizers.TokenizerError as e:
        raise ExportError(f"the run's tokenizer: {e}") from e
    eos = int(built.eod)
    try:
        bos = built.bos
    except (AttributeError, NotImplementedError, ValueError):
        bos = None
    return ExportTokenizer(
        source=str(data.tokenizer_model or data.vocab_file),
        vocab_size=tokenizers.megatron_vocab_size(kind, built),
        bos_id=int(bos) if isinstance(bos, int) and bos >= 0 else None,
        eos_id=eos,
        pad_id=eos,
        write=lambda out: _save(kind, built, out),
    )


def _save(kind: str, built: Any, out: Path) -> None:
    from megatron_wsm.data import tokenizers

    tokenizers.save_for_transformers(kind, built, out)
