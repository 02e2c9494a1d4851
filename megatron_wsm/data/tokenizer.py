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
import io
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

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
    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        # One thread: multi-threaded BPE training can break ties in a different order.
        num_threads=1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_LENGTH,
        minloglevel=2,  # SentencePiece logs every merge at INFO; keep the console readable
    )
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
