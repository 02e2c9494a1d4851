"""Megatron-LM's ``--tokenizer-type`` values, built through megatron-core's tokenizer library.

Megatron-LM core_v0.16.1 builds two tokenizers from the same flags, and this module follows
each where it matters:

* the **data** tokenizer (``tools/preprocess_data.py`` and ``pretrain_gpt.py``'s datasets) is
  megatron-core's ``megatron.core.tokenizers`` one (``MegatronTokenizer.from_pretrained`` with
  the library and keyword arguments of ``megatron.core.tokenizers.text.utils.build_tokenizer``):
  its ``tokenize`` makes the ``.bin`` token ids and its ``eod`` ends every document;
* the **vocabulary padding** (``args.padded_vocab_size``, the embedding's rows) comes from the
  legacy ``megatron.training.tokenizer`` one, which ``set_global_variables`` always builds. The
  two agree on the vocabulary size except for ``SentencePieceTokenizer``, whose legacy wrapper
  appends ``<CLS> <SEP> <EOD> <MASK>`` (and ``<PAD>``/``<BOS>``/``<EOS>`` when the model lacks
  them) after the model's pieces: :func:`megatron_vocab_size` counts them the same way, so the
  padded size (and a Megatron-LM checkpoint's embedding shape) match.

Two types are not taken from megatron-core as is:

* ``GPT2BPETokenizer``: megatron-core 0.16 maps it to a Hugging Face ``gpt2`` tokenizer that it
  downloads from the hub (and passes ``--merge-file`` under a misspelt keyword), so it cannot
  run offline; Megatron-LM's offline path is its legacy tokenizer (``--legacy-tokenizer``).
  :class:`GPT2BPETokenizer` reads ``--vocab-file``/``--merge-file`` with the ``tokenizers``
  library's byte-level BPE (GPT-2's algorithm, byte encoder and pre-tokenizer regex),
  ``eod`` = ``<|endoftext|>``, and its ids equal the legacy tokenizer's
  (``tests/unit/test_preprocess_parity.py``).
* no ``--tokenizer-type``: our own :class:`~megatron_wsm.data.tokenizer.SentencePieceTokenizer`
  (the built-in corpora's tokenizer; ``--tokenizer-model x.model`` alone keeps meaning it).

``TikTokenizer`` is megatron-core's ``TikTokenTokenizer`` (library ``tiktoken``, the keyword
arguments of its ``build_tokenizer``): ``--tokenizer-model`` is a tiktoken vocabulary in
Megatron-LM's JSON format (a list of ``{"rank", "token_bytes", "token_str"}``, ``token_bytes``
base64), checked here first (:func:`read_tiktoken_ranks`: megatron-core only asserts, and a
hostile file should be refused with a reason). Ids ``0 .. num_special - 1`` are the special
tokens (``</s>`` = id 2 is the EOD), the file's ranks follow, cut to ``vocab_size -
num_special``. The vocabulary is Megatron-LM's ``--vocab-size``; without it Megatron-LM takes
2**17, which needs that many ranks: here the file's own size is taken when it is smaller
(``num_special + ranks``, where Megatron-LM would stop on an assertion).

``HuggingFaceTokenizer`` reads a local directory (or a hub id's copy in the local Hugging Face
cache: nothing is downloaded) and never runs code from it:
``trust_remote_code=False`` always (an ``auto_map`` in its ``tokenizer_config.json`` is refused
by transformers instead of imported).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

from megatron.core.tokenizers import MegatronTokenizer, MegatronTokenizerBase

from megatron_wsm.config.data import (
    HF_REPO_ID,
    TOKENIZER_TYPES,
    UNSUPPORTED_TOKENIZER_TYPES,
)
from megatron_wsm.config.fields import ConfigError

__all__ = [
    "TIKTOKEN_DEFAULT_VOCAB",
    "GPT2BPETokenizer",
    "TokenizerError",
    "build_tokenizer",
    "megatron_vocab_size",
    "read_tiktoken_ranks",
    "save_for_transformers",
    "tokenizer_from_config",
]

#: Types whose ``--tokenizer-model`` is a sentencepiece ``.model`` (megatron-core's
#: ``SP_TOKENIZERS``).
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")

#: What Megatron-LM's legacy ``_SentencePieceTokenizer`` appends after the model's pieces when
#: they are missing (in this order); pad/bos/eos use the model's own piece when it has one.
_LEGACY_SP_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")


#: Megatron-LM's TikTokenizer vocabulary without ``--vocab-size`` (megatron-core's
#: ``DEFAULT_TIKTOKEN_MAX_VOCAB``, the legacy tokenizer's fallback).
TIKTOKEN_DEFAULT_VOCAB = 2**17
#: The special tokens megatron-core's ``TikTokenTokenizer`` requires (its default list).
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
#: The largest tiktoken vocabulary file read (a 2**17-rank file is about 10 MB).
TIKTOKEN_MAX_FILE_BYTES = 256 * 2**20


class TokenizerError(ConfigError):
    """A tokenizer could not be built from the given flags and files."""


class GPT2BPETokenizer(MegatronTokenizerBase):
    """GPT-2 byte-level BPE from a ``vocab.json`` and a ``merges.txt`` (no download).

    Megatron-LM's legacy ``_GPT2BPETokenizer`` semantics: ``vocab_size`` = entries of
    ``vocab.json``, ``eod`` = the id of ``<|endoftext|>`` (required in the vocabulary),
    ``tokenize`` adds no special tokens.
    """

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        """Load ``vocab_file`` and ``merge_file``."""
        super().__init__(vocab_file, config={"library": "gpt2-bpe"})
        self.vocab_file = str(vocab_file)
        self.merge_file = str(merge_file)
        self._load()

    def _load(self) -> None:
        # The `tokenizers` library's byte-level BPE: GPT-2's byte encoder, pre-tokenizer regex
        # and merge order. <|endoftext|> is not an added token: Megatron-LM's GPT-2 tokenizer
        # does not split it out of the text either.
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            bpe = models.BPE.from_file(self.vocab_file, self.merge_file)
        except Exception as err:  # the Rust library's errors are plain Exceptions
            raise TokenizerError(
                f"--vocab-file {self.vocab_file} / --merge-file {self.merge_file}: {err}"
            ) from err
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self._encoder: dict[str, int] = dict(tok.get_vocab(with_added_tokens=False))
        if self.EOD_TOKEN not in self._encoder:
            raise TokenizerError(f"--vocab-file {self.vocab_file}: no {self.EOD_TOKEN} entry")
        self._eod = self._encoder[self.EOD_TOKEN]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the file paths; the fast tokenizer is rebuilt on unpickling."""
        state = self.__dict__.copy()
        state.pop("_tok", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the tokenizer from the pickled paths."""
        self.__dict__.update(state)
        self._load()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: a pretraining tokenizer without a chat template."""
        raise NotImplementedError("GPT2BPETokenizer has no chat template")

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id."""
        return self._encoder

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token."""
        return {i: t for t, i in self._encoder.items()}

    @property
    def vocab_size(self) -> int:
        """Entries of ``vocab.json`` (Megatron-LM: ``len(encoder)``)."""
        return len(self._encoder)

    @property
    def eod(self) -> int:
        """The ``<|endoftext|>`` id."""
        return self._eod

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self._eod

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What megatron-core's dataset cache key hashes."""
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("vocab_file", self.vocab_file),
                ("merge_file", self.merge_file),
            ]
        )


def build_tokenizer(
    tokenizer_type: str | None,
    tokenizer_model: str | None = None,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    hf_use_fast: bool = False,
    hf_include_special_tokens: bool = False,
    tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int = 1000,
    tokenizer_special_tokens: Sequence[str] | None = None,
) -> Any:
    """The data tokenizer of ``--tokenizer-type`` (``None``: our sentencepiece wrapper).

    Arguments are Megatron-LM's flags of the same names (``vocab_size`` None: not given); the
    returned object has what
    megatron-core's datasets read (``tokenize``, ``eod``, ``vocab_size``,
    ``unique_identifiers``). Raises :class:`TokenizerError` with the reason when the type is
    not built here or its files are missing.
    """
    if tokenizer_type is None:
        if tokenizer_model is None:
            raise TokenizerError("no tokenizer: give --tokenizer-model or --tokenizer-type")
        from megatron_wsm.data.tokenizer import SentencePieceTokenizer

        _need_file("--tokenizer-model", tokenizer_model)
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type in UNSUPPORTED_TOKENIZER_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type} is not supported: "
            f"{UNSUPPORTED_TOKENIZER_TYPES[tokenizer_type]}"
        )
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type!r}: choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError("--tokenizer-type NullTokenizer needs a positive --vocab-size")
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null"}, vocab_size=int(vocab_size)
        )
    if tokenizer_type == "TikTokenizer":
        return build_tiktokenizer(
            tokenizer_model,
            pattern=tiktoken_pattern,
            vocab_size=vocab_size,
            num_special_tokens=tiktoken_num_special_tokens,
            special_tokens=tokenizer_special_tokens,
        )
    if tokenizer_type in ("GPT2BPETokenizer", "HuggingFaceTokenizer"):
        _need_hf_extra(tokenizer_type)
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None or merge_file is None:
            raise TokenizerError(
                "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file"
            )
        _need_file("--vocab-file", vocab_file)
        _need_file("--merge-file", merge_file)
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_model is None:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type} needs {TOKENIZER_TYPES[tokenizer_type]}"
        )
    if tokenizer_type in SENTENCEPIECE_TYPES:
        _need_file("--tokenizer-model", tokenizer_model)
        # megatron-core's keyword arguments for these types with Megatron-LM's flag defaults
        # (--tokenizer-sentencepiece-legacy off, no --tokenizer-special-tokens).
        return MegatronTokenizer.from_pretrained(
            tokenizer_path=tokenizer_model,
            metadata_path={"library": "sentencepiece"},
            legacy=False,
            special_tokens=None,
        )
    # HuggingFaceTokenizer
    local = hf_tokenizer_directory(tokenizer_model)
    try:
        return MegatronTokenizer.from_pretrained(
            tokenizer_path=local,
            metadata_path={"library": "huggingface"},
            vocab_file=vocab_file,
            merges_file=merge_file,
            additional_special_tokens=[],
            use_fast=hf_use_fast,
            # Never: a tokenizer directory's auto_map would import and run its Python files.
            trust_remote_code=False,
            include_special_tokens=hf_include_special_tokens,
        )
    except ValueError as err:  # megatron-core wraps every transformers failure in ValueError
        raise TokenizerError(f"--tokenizer-model {tokenizer_model}: {err}") from err


def need_tiktoken() -> None:
    """Refuse ``--tokenizer-type TikTokenizer`` without the ``tiktoken`` package (its extra)."""
    import importlib.util

    if importlib.util.find_spec("tiktoken") is None:
        raise TokenizerError(
            "--tokenizer-type TikTokenizer needs the tiktoken package: "
            "pip install 'megatron-wsm[tiktoken]' (or pip install tiktoken)"
        )


def read_tiktoken_ranks(path: str, max_ranks: int | None = None) -> int:
    """Check a tiktoken vocabulary in Megatron-LM's JSON format; returns its number of ranks.

    What megatron-core's ``reload_mergeable_ranks`` asserts, as clear refusals: a ``.json``
    file (at most :data:`TIKTOKEN_MAX_FILE_BYTES`) holding a list whose entry ``i`` is an
    object with exactly ``rank`` (= ``i``), ``token_bytes`` (base64) and ``token_str`` (a
    string); the first 256 are the single bytes ``0..255``; no token twice. Like
    megatron-core, only the first ``max_ranks`` entries (the ones used) are checked.
    """
    import base64
    import binascii
    import json

    where = f"--tokenizer-model {path}"
    if not path.endswith(".json"):
        raise TokenizerError(f"{where}: a tiktoken vocabulary is a .json file (Megatron-LM's)")
    _need_file("--tokenizer-model", path)
    size = os.path.getsize(path)
    if size > TIKTOKEN_MAX_FILE_BYTES:
        raise TokenizerError(
            f"{where}: {size} bytes, more than the {TIKTOKEN_MAX_FILE_BYTES} read for a tiktoken "
            "vocabulary"
        )
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TokenizerError(f"{where}: not a valid JSON file ({err})") from None
    if not isinstance(vocab, list):
        raise TokenizerError(
            f"{where}: a tiktoken vocabulary is a JSON list of "
            '{"rank", "token_bytes", "token_str"} objects, not a ' + type(vocab).__name__
        )
    used = vocab if max_ranks is None else vocab[: max(max_ranks, 0)]
    seen: set[bytes] = set()
    for i, entry in enumerate(used):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"}:
            raise TokenizerError(
                f"{where}: entry {i} is not an object with exactly the keys rank, token_bytes, "
                "token_str"
            )
        rank, token_bytes = entry["rank"], entry["token_bytes"]
        if type(rank) is not int or rank != i:
            raise TokenizerError(f"{where}: entry {i} has rank {rank!r}, expected {i}")
        if not isinstance(token_bytes, str) or not isinstance(entry["token_str"], str):
            raise TokenizerError(f"{where}: entry {i}: token_bytes and token_str must be strings")
        try:
            token = base64.b64decode(token_bytes, validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: entry {i}: token_bytes is not base64") from None
        if i < 256 and token != bytes([i]):
            raise TokenizerError(f"{where}: entry {i} must be the single byte {i} (ranks 0-255)")
        if not token or token in seen:
            raise TokenizerError(f"{where}: entry {i}: an empty or repeated token")
        seen.add(token)
    return len(vocab)


def build_tiktokenizer(
    tokenizer_model: str | None,
    *,
    pattern: str | None = None,
    vocab_size: int | None = None,
    num_special_tokens: int = 1000,
    special_tokens: Sequence[str] | None = None,
) -> Any:
    """megatron-core's ``TikTokenTokenizer`` of Megatron-LM's ``--tokenizer-model`` (a tiktoken
    vocabulary ``.json``), ``--tiktoken-pattern`` (v1/v2; None: v2, megatron-core's default),
    ``--vocab-size`` (None: 2**17, or the file's special tokens + ranks when fewer),
    ``--tiktoken-num-special-tokens`` and ``--tokenizer-special-tokens`` (None:
    megatron-core's seven); each checked first with the reason."""
    need_tiktoken()
    if tokenizer_model is None:
        raise TokenizerError(
            "--tokenizer-type TikTokenizer needs --tokenizer-model (a tiktoken vocabulary .json)"
        )
    if pattern not in (None, "v1", "v2"):
        raise TokenizerError(f"--tiktoken-pattern {pattern!r}: choose v1 or v2")
    specials = list(TIKTOKEN_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"--tokenizer-special-tokens {specials}: a token is repeated")
    missing = [t for t in TIKTOKEN_SPECIAL_TOKENS if t not in specials]
    if missing:
        raise TokenizerError(
            f"--tokenizer-special-tokens must include {' '.join(TIKTOKEN_SPECIAL_TOKENS)} "
            f"(megatron-core's TikTokenizer); missing: {' '.join(missing)}"
        )
    if num_special_tokens < len(specials):
        raise TokenizerError(
            f"--tiktoken-num-special-tokens {num_special_tokens} is fewer than the "
            f"{len(specials)} special tokens"
        )
    ranks = read_tiktoken_ranks(
        tokenizer_model,
        None if vocab_size is None else vocab_size - num_special_tokens,
    )
    if vocab_size is None:
        vocab_size = min(TIKTOKEN_DEFAULT_VOCAB, num_special_tokens + ranks)
    if vocab_size <= num_special_tokens:
        raise TokenizerError(
            f"--vocab-size {vocab_size} must exceed --tiktoken-num-special-tokens "
            f"{num_special_tokens} (the vocabulary holds the special tokens, then the ranks)"
        )
    if ranks < vocab_size - num_special_tokens:
        raise TokenizerError(
            f"--tokenizer-model {tokenizer_model}: {ranks} ranks, fewer than --vocab-size "
            f"{vocab_size} - {num_special_tokens} special tokens = "
            f"{vocab_size - num_special_tokens} (give --vocab-size "
            f"{num_special_tokens + ranks} or less)"
        )
    kwargs: dict[str, Any] = {"pattern": pattern} if pattern else {}
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=tokenizer_model,
        metadata_path={"library": "tiktoken"},
        vocab_size=int(vocab_size),
        num_special_tokens=int(num_special_tokens),
        special_tokens=None if special_tokens is None else list(special_tokens),
        **kwargs,
    )


def hf_tokenizer_directory(tokenizer_model: str) -> str:
    """The local directory of a ``HuggingFaceTokenizer``'s ``--tokenizer-model``.

    A directory is used as it is. A hub id (``Qwen/Qwen3-30B-A3B``, what Megatron-LM's scripts
    pass) is looked up in the local Hugging Face cache only (``HF_HUB_CACHE`` / ``HF_HOME``):
    nothing is downloaded, a missing tokenizer is refused with the way to get it.
    """
    if os.path.isdir(tokenizer_model):
        return tokenizer_model
    if not HF_REPO_ID.match(tokenizer_model) or os.path.exists(tokenizer_model):
        raise TokenizerError(
            f"--tokenizer-model {tokenizer_model}: not a directory (HuggingFaceTokenizer reads a "
            "local tokenizer directory, or a hub id already in the local Hugging Face cache)"
        )
    _need_hf_extra("HuggingFaceTokenizer")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(tokenizer_model, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise TokenizerError(
            f"--tokenizer-model {tokenizer_model}: neither a local directory nor in the local "
            "Hugging Face cache (nothing is downloaded here: fetch it first, e.g. "
            f"`hf download {tokenizer_model} --include 'tokenizer*'`, or pass a directory)"
        ) from err


def tokenizer_from_config(data: Any) -> Any:
    """:func:`build_tokenizer` of a :class:`~megatron_wsm.config.DataConfig`'s flags."""
    return build_tokenizer(
        data.tokenizer_type,
        data.tokenizer_model,
        vocab_file=data.vocab_file,
        merge_file=data.merge_file,
        vocab_size=data.given_vocab_size(),
        hf_use_fast=data.tokenizer_hf_use_fast,
        hf_include_special_tokens=data.tokenizer_hf_include_special_tokens,
        tiktoken_pattern=data.tiktoken_pattern,
        tiktoken_num_special_tokens=data.tiktoken_num_special_tokens,
        tokenizer_special_tokens=data.special_tokens(),
    )


def megatron_vocab_size(tokenizer_type: str | None, tokenizer: Any) -> int:
    """The vocabulary size Megatron-LM pads (its legacy tokenizer's ``vocab_size``).

    Equal to ``tokenizer.vocab_size`` except for ``SentencePieceTokenizer``, whose legacy
    wrapper adds the special pieces the model lacks (see the module docstring).
    """
    if tokenizer_type != "SentencePieceTokenizer":
        return int(tokenizer.vocab_size)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    added: list[str] = []
    for token in _LEGACY_SP_SPECIALS:
        if token not in pieces and token not in added:
            added.append(token)
    for special_id, fallback in (
        (sp.pad_id(), "<PAD>"),
        (sp.bos_id(), "<BOS>"),
        (sp.eos_id(), "<EOS>"),
    ):
        token = sp.id_to_piece(special_id) if 0 <= special_id < sp.get_piece_size() else fallback
        if token not in pieces and token not in added:
            added.append(token)
    return sp.get_piece_size() + len(added)


def _need_file(flag: str, path: str) -> None:
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: file not found")


def _need_hf_extra(tokenizer_type: str) -> None:
    import importlib.util

    for module in ("tokenizers", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise TokenizerError(
                f"--tokenizer-type {tokenizer_type} needs the {module} package: "
                "pip install 'megatron-wsm[hf]'"
            )


#: Types whose tokenizer :func:`save_for_transformers` writes (the sentencepiece types are
#: written by the export's own sentencepiece path; NullTokenizer has no text tokenizer).
TRANSFORMERS_SAVABLE = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "TikTokenizer")


def save_for_transformers(tokenizer_type: str, tokenizer: Any, out: str | os.PathLike[str]) -> int:
    """Write ``tokenizer`` (built by :func:`build_tokenizer`) into ``out`` so that
    transformers' ``AutoTokenizer.from_pretrained(out)`` encodes text to the same ids (without
    special tokens); returns the vocabulary size.

    ``HuggingFaceTokenizer``: the loaded tokenizer's ``save_pretrained`` (its
    ``tokenizer.json``/``tokenizer_config.json``; no Python file of the source directory is
    copied). ``GPT2BPETokenizer``: the byte-level BPE as a ``tokenizer.json`` with
    ``<|endoftext|>`` as bos/eos/unk (transformers treats that string as one special token where
    it appears in text; Megatron-LM's GPT-2 tokenizer splits it like any text).
    ``TikTokenizer``: :func:`tiktoken_as_transformers` (its special tokens named as in
    megatron-core: ``<s>``, ``</s>``, ``<unk>``, ``<pad>``).
    """
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    if tokenizer_type == "HuggingFaceTokenizer":
        tokenizer.save_pretrained(os.fspath(out))
        return int(tokenizer.vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        eod = GPT2BPETokenizer.EOD_TOKEN
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer._tok, bos_token=eod, eos_token=eod, unk_token=eod
        )
        fast.save_pretrained(os.fspath(out))
        return int(tokenizer.vocab_size)
    if tokenizer_type == "TikTokenizer":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tiktoken_as_transformers(tokenizer),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
        fast.save_pretrained(os.fspath(out))
        return int(tokenizer.vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type}: not written here (types: "
        f"{', '.join(TRANSFORMERS_SAVABLE)})"
    )


def tiktoken_as_transformers(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` giving the ids of a :func:`build_tiktokenizer` tokenizer.

    tiktoken's BPE as a byte-level BPE (the conversion of transformers' ``TikTokenConverter``:
    each rank's byte string in GPT-2's byte-to-unicode alphabet, the merges recovered from the
    ranks, ``ignore_merges`` so a pre-token that is one rank stays whole, the same split regex),
    ids shifted by the special tokens as megatron-core shifts them, and the special tokens as
    added tokens at ids ``0 .. num_special - 1`` (split out of text, as megatron-core's
    ``allowed_special="all"`` does).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inner = tokenizer._tokenizer  # megatron-core's TikTokenTokenizer
    ranks: dict[bytes, int] = inner.token2id  # token bytes -> id (already shifted)
    specials: list[str] = list(inner.special_tokens)
    byte_encoder = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {text(token): i for token, i in ranks.items()}
    clash = [t for t in specials if t in vocab]
    if clash:
        raise TokenizerError(
            f"special tokens {clash} are also byte-level tokens of the vocabulary: not written "
            "for transformers"
        )
    vocab.update({t: i for i, t in enumerate(specials)})
    merges: list[tuple[int, str, str]] = []
    for token, i in ranks.items():
        splits = [
            (ranks[token[:k]], ranks[token[k:]], token[:k], token[k:])
            for k in range(1, len(token))
            if token[:k] in ranks and token[k:] in ranks
        ]
        merges.extend((i, text(left), text(right)) for _, _, left, right in sorted(splits))
    merges.sort(key=lambda m: m[0])
    bpe = models.BPE(vocab, [(left, right) for _, left, right in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.model.ignore_merges = True
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(inner.tokenizer._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok
