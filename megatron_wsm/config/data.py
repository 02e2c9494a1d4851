"""Where training tokens come from: :class:`DataConfig` (tokenizer and datasets)."""

from __future__ import annotations

import dataclasses
import os

from megatron_wsm.config.fields import ConfigError, flag_field

#: Built-in corpora selectable with ``--data-source`` (``megatron_wsm.data``: ``corpus.py``,
#: ``env_python.py``).
DATA_SOURCES = ("embedded", "env-python")

# tokenizer (H3)
#: Megatron-LM's ``--tokenizer-type`` values (core_v0.16.1 ``_add_tokenizer_args``) that this
#: trainer builds (``megatron_wsm.data.tokenizers``), each with the tokenizer file flag it needs.
TOKENIZER_TYPES: dict[str, str] = {
    "HuggingFaceTokenizer": "--tokenizer-model (a local tokenizer directory)",
    "GPT2BPETokenizer": "--vocab-file and --merge-file",
    "SentencePieceTokenizer": "--tokenizer-model (a sentencepiece .model file)",
    "GPTSentencePieceTokenizer": "--tokenizer-model (a sentencepiece .model file)",
    "Llama2Tokenizer": "--tokenizer-model (a sentencepiece .model file)",
    "NullTokenizer": "--vocab-size",
}
#: Megatron-LM's other ``--tokenizer-type`` values, refused with the reason.
UNSUPPORTED_TOKENIZER_TYPES: dict[str, str] = {
    "BertWordPieceLowerCase": "a BERT/T5 tokenizer; this trainer builds GPT models",
    "BertWordPieceCase": "a BERT/T5 tokenizer; this trainer builds GPT models",
    "TikTokenizer": "needs the tiktoken package and --tiktoken-* flags, not wired here yet",
    "MultimodalTokenizer": "multimodal models are not built here",
    "NullMultimodalTokenizer": "multimodal models are not built here",
    "SFTTokenizer": "fine-tuning chat data is not read here (pretraining only)",
}


@dataclasses.dataclass
class DataConfig:
    """Where training tokens come from."""

    GROUP = "data"

    data_path: str | None = flag_field(
        None,
        "indexed dataset prefix (.bin/.idx, see tools/preprocess_data.py); "
        "default: the embedded corpus",
    )
    split: str = flag_field("969,30,1", "train,valid,test weights of --data-path")
    data_cache_dir: str = flag_field("data_cache", "embedded corpus cache")
    # tokenizer (H3: these fields stay together; Megatron-LM's names and meanings)
    tokenizer_type: str | None = flag_field(
        None,
        "Megatron-LM's tokenizer type, built through megatron-core's tokenizer library: "
        "HuggingFaceTokenizer (--tokenizer-model: a local tokenizer directory), "
        "GPT2BPETokenizer (--vocab-file, --merge-file), SentencePieceTokenizer / "
        "GPTSentencePieceTokenizer / Llama2Tokenizer (--tokenizer-model: a .model file), "
        "NullTokenizer (--vocab-size ids + EOD); default: our own sentencepiece wrapper of "
        "--tokenizer-model or of the built-in corpus (docs/data.md)",
        choices=[*TOKENIZER_TYPES, *UNSUPPORTED_TOKENIZER_TYPES],
    )
    tokenizer_model: str | None = flag_field(
        None,
        "sentencepiece .model file, or with --tokenizer-type HuggingFaceTokenizer a local "
        "Hugging Face tokenizer directory",
    )
    vocab_file: str | None = flag_field(None, "GPT2BPETokenizer: the vocab.json file")
    merge_file: str | None = flag_field(None, "GPT2BPETokenizer: the merges.txt file")
    vocab_size: int = flag_field(
        4096,
        "built-in corpus: the vocabulary of the tokenizer trained on it; NullTokenizer: ids "
        "before EOD (Megatron-LM's meaning: the model gets vocab size + 1 ids, then padding)",
    )
    make_vocab_size_divisible_by: int = flag_field(
        128,
        "pad the vocabulary to a multiple of this times the tensor-parallel size "
        "(Megatron-LM's padding)",
    )
    tokenizer_hf_use_fast: bool = flag_field(
        False, "HuggingFaceTokenizer: load the fast tokenizer (Megatron-LM's flag)"
    )
    tokenizer_hf_include_special_tokens: bool = flag_field(
        False,
        "HuggingFaceTokenizer: text to ids adds the tokenizer's special tokens (e.g. BOS), "
        "as Megatron-LM's flag",
    )
    # end of the tokenizer fields
    data_source: str = flag_field(
        "embedded",
        "built-in corpus without --data-path: embedded (CPython's help topics and docstrings, "
        "1.5 MB) or env-python (the .py files of this interpreter's stdlib and site-packages, "
        "hundreds of MB; pass e.g. --vocab-size 16384; built once into --data-cache-dir)",
        choices=list(DATA_SOURCES),
    )
    data_max_bytes: int | None = flag_field(
        None,
        "env-python: use only the first files of its selection, up to this many bytes of text "
        "(a quick slice); default: all",
    )

    def validate(self) -> None:
        """The dataset and tokenizer files exist and belong together; the built-in corpus
        options are consistent."""
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(
                f"--data-source {self.data_source!r}: choose one of {', '.join(DATA_SOURCES)}"
            )
        if self.data_path is not None and self.data_source != "embedded":
            raise ConfigError(
                f"--data-source {self.data_source} selects a built-in corpus; --data-path "
                "replaces it (give one of the two)"
            )
        if self.data_max_bytes is not None:
            if self.data_source != "env-python":
                raise ConfigError("--data-max-bytes applies to --data-source env-python only")
            if self.data_max_bytes <= 0:
                raise ConfigError(f"--data-max-bytes must be positive, got {self.data_max_bytes}")
        path = self.data_path
        if path is not None and not (
            os.path.exists(path + ".bin") and os.path.exists(path + ".idx")
        ):
            raise ConfigError(f"--data-path {path}: {path}.bin / {path}.idx not found")
        self.validate_tokenizer()
        if (
            self.tokenizer_type is not None
            and path is None
            and not getattr(self, "mock_data", False)  # H4's --mock-data, where present
        ):
            raise ConfigError(
                f"--tokenizer-type {self.tokenizer_type} needs --data-path (data made with that "
                "tokenizer) or --mock-data; the built-in corpus brings its own tokenizer"
            )
        if path is not None and self.tokenizer_model is None and self.tokenizer_type is None:
            raise ConfigError(
                "--data-path needs the tokenizer that made the data: --tokenizer-model, or "
                "--tokenizer-type with its files"
            )

    # tokenizer (H3)
    def validate_tokenizer(self) -> None:
        """The tokenizer flags name a type this trainer builds and the files it needs."""
        kind = self.tokenizer_type
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError(
                f"--make-vocab-size-divisible-by must be >= 1, got "
                f"{self.make_vocab_size_divisible_by}"
            )
        if kind in UNSUPPORTED_TOKENIZER_TYPES:
            raise ConfigError(
                f"--tokenizer-type {kind} is not supported: {UNSUPPORTED_TOKENIZER_TYPES[kind]}"
            )
        if kind is not None and kind not in TOKENIZER_TYPES:
            raise ConfigError(
                f"--tokenizer-type {kind!r}: choose one of {', '.join(TOKENIZER_TYPES)}"
            )
        if kind == "NullTokenizer":
            if self.vocab_size < 1:
                raise ConfigError(f"--vocab-size must be positive, got {self.vocab_size}")
        elif kind == "GPT2BPETokenizer":
            for flag, value in (
                ("--vocab-file", self.vocab_file),
                ("--merge-file", self.merge_file),
            ):
                if value is None:
                    raise ConfigError(f"--tokenizer-type GPT2BPETokenizer needs {flag}")
                if not os.path.isfile(value):
                    raise ConfigError(f"{flag} {value}: file not found")
        elif kind == "HuggingFaceTokenizer":
            if self.tokenizer_model is None:
                raise ConfigError(
                    "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a local "
                    "tokenizer directory)"
                )
            if not os.path.isdir(self.tokenizer_model):
                raise ConfigError(
                    f"--tokenizer-model {self.tokenizer_model}: not a directory (a "
                    "HuggingFaceTokenizer is read from a local directory with tokenizer.json / "
                    "tokenizer_config.json; hub names are not fetched)"
                )
        elif kind is not None or self.tokenizer_model is not None:
            if self.tokenizer_model is None:
                raise ConfigError(f"--tokenizer-type {kind} needs {TOKENIZER_TYPES[str(kind)]}")
            if not os.path.isfile(self.tokenizer_model):
                raise ConfigError(f"--tokenizer-model {self.tokenizer_model}: file not found")
