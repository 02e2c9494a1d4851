"""SentencePiece BPE tokenizer: deterministic training and a megatron-core tokenizer wrapper.

Training settings are chosen so that ``detokenize(tokenize(text)) == text`` for any text:

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False`` and
  ``add_dummy_prefix=False``: text is not rewritten (code and docstrings depend on indentation);
* ``byte_fallback=True``: characters outside the vocabulary become UTF-8 byte pieces, never
  ``<unk>``;
* ``"\\n"`` is a user-defined piece (training sees one line at a time, so it would otherwise only
  be reachable as a byte), and whitespace-only pieces (indentation) are allowed.

Special ids are fixed: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2, ``<pad>`` = 3. The
end-of-document token ``eod`` is the eos id. Training is single-threaded with a fixed random seed
and a bounded sentence sample, so the same input gives the same model bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import numpy as np
import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

# Training lives in a module that does not import megatron-core (seconds of import time), so the
# tokenizer-training CLI starts fast; it is re-exported here as the public entry point.
from megatron_wsm.data.spm_training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    train_sentencepiece,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "SentencePieceTokenizer",
    "train_sentencepiece",
]


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece model behind megatron-core's tokenizer interface.

    Subclasses :class:`megatron.core.tokenizers.MegatronTokenizerBase` (what ``GPTDatasetConfig``
    is typed against in megatron-core 0.16) and provides everything ``GPTDataset`` reads:
    ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (hashed into the dataset-index
    cache key, so it holds the model's SHA-256 rather than its path: a retrained tokenizer never
    reuses stale indices, a copied one does).

    Special tokens: ``eod`` = ``eos`` = SentencePiece's eos id; ``pad`` = SentencePiece's pad id
    when the model has one (models trained by :func:`train_sentencepiece` do, id 3), otherwise
    ``eod``. Note that when ``pad == eod`` megatron-core's ``GPTDataset`` warns and stops treating
    pad specially; a distinct pad id avoids that. ``tokenize`` returns a list of ints and never
    adds bos/eos; append ``eod`` yourself where a document ends.

    The object pickles (by value: the serialized model travels with it), so datasets holding it
    work with ``DataLoader`` workers under any start method.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        """Load the SentencePiece model at ``model_path``."""
        super().__init__(str(model_path), config={"library": "sentencepiece"})
        with open(model_path, "rb") as f:
            self._load(f.read())

    def _load(self, model_bytes: bytes) -> None:
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._vocab: dict[str, int] | None = None
        digest = hashlib.sha256(model_bytes).hexdigest()
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("model_sha256", digest),
                ("vocab_size", self._sp.get_piece_size()),
            ]
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the model bytes, not the (unpicklable) native processor."""
        state = self.__dict__.copy()
        state.pop("_sp", None)
        state["_vocab"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the native processor from the pickled model bytes."""
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)

    # -- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts at once (SentencePiece's batched encoder)."""
        return self._sp.encode(list(texts), out_type=int)

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a sequence of token ids (inverse of :meth:`tokenize`)."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: this is a pretraining tokenizer without a chat template."""
        raise NotImplementedError("SentencePieceTokenizer has no chat template")

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces (the embedding table needs at least this many rows)."""
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> piece."""
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def model_path(self) -> str:
        """Path the model was loaded from."""
        return self.path

    # -- special tokens -------------------------------------------------------------------------
    @property
    def eos(self) -> int:
        """End-of-sentence id."""
        return self._sp.eos_id()

    @property
    def eod(self) -> int:
        """End-of-document id (the eos id), appended after every document when preprocessing."""
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        """Beginning-of-sentence id."""
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        """Unknown-piece id (unused in practice thanks to byte fallback)."""
        return self._sp.unk_id()

    @property
    def pad(self) -> int:
        """Padding id: the model's pad id if it has one, else ``eod``."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"
