"""Where training tokens come from: :class:`DataConfig` (tokenizer and datasets)."""

from __future__ import annotations

import dataclasses
import os
import re

from megatron_wsm.config.fields import ConfigError, flag_field, negate

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
    "TikTokenizer": "--tokenizer-model (a tiktoken vocabulary .json, Megatron-LM's format)",
}
#: ``--vocab-size``'s default here (the built-in corpus's vocabulary); Megatron-LM has none.
DEFAULT_VOCAB_SIZE = 4096
#: The tiktoken split patterns of ``--tiktoken-pattern`` (megatron-core's).
TIKTOKEN_PATTERNS = ("v1", "v2")
#: A Hugging Face hub repository id (``org/name``) as Megatron-LM launch scripts pass to
#: ``--tokenizer-model``; read from the local Hugging Face cache only.
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Megatron-LM's other ``--tokenizer-type`` values, refused with the reason.
UNSUPPORTED_TOKENIZER_TYPES: dict[str, str] = {
    "BertWordPieceLowerCase": "a BERT/T5 tokenizer; this trainer builds GPT models",
    "BertWordPieceCase": "a BERT/T5 tokenizer; this trainer builds GPT models",
    "MultimodalTokenizer": "multimodal models are not built here",
    "NullMultimodalTokenizer": "multimodal models are not built here",
    "SFTTokenizer": "fine-tuning chat data is not read here (pretraining only)",
}


@dataclasses.dataclass
class DataConfig:
    """Where training tokens come from."""

    GROUP = "data"

    # data paths (H4: these fields stay together; Megatron-LM's names and meanings,
    # megatron_wsm/config/blends.py reads them)
    data_path: list[str] | None = flag_field(
        None,
        "Megatron-LM's --data-path: one indexed dataset prefix (.bin/.idx, see "
        "tools/preprocess_data.py), several prefixes (weighted by their sizes) or weight/prefix "
        "pairs 'W1 P1 W2 P2 ...'; the splits are cut by --split; default: the built-in corpus",
        nargs="*",
    )
    split: str | None = flag_field(
        None,
        "train,valid,test weights cutting each --data-path dataset by document (default "
        "969,30,1, Megatron-LM's legacy default; with --mock-data 1,1,1, megatron-core's)",
    )
    train_data_path: list[str] | None = flag_field(
        None,
        "the training blend, in --data-path's forms (Megatron-LM's per-split paths)",
        nargs="*",
    )
    valid_data_path: list[str] | None = flag_field(
        None, "the validation blend, in --data-path's forms", nargs="*"
    )
    test_data_path: list[str] | None = flag_field(
        None, "the test blend, in --data-path's forms", nargs="*"
    )
    data_args_path: str | None = flag_field(
        None, "a text file holding --data-path's words (for long blends; Megatron-LM's flag)"
    )
    per_split_data_args_path: str | None = flag_field(
        None,
        'a JSON file {"train": ..., "valid": ..., "test": ...} of per-split blends, each '
        "a string or list of --data-path's words, or null (Megatron-LM's flag)",
    )
    mock_data: bool = flag_field(
        False,
        "train on megatron-core's MockGPTDataset (synthetic token ramps) instead of files; "
        "needs a tokenizer, e.g. --tokenizer-type NullTokenizer --vocab-size N",
    )
    data_cache_path: str | None = flag_field(
        None,
        "directory of megatron-core's sample-index cache for --data-path data (default: "
        "gpt_index_cache beside the first dataset)",
    )
    num_dataset_builder_threads: int = flag_field(
        1, "threads per rank building the datasets of a blend (megatron-core)"
    )
    mmap_bin_files: bool = flag_field(
        True,
        "read .bin files with file reads instead of mmap (megatron-core)",
        flag="--no-mmap-bin-files",
        dest="no_mmap_bin_files",
        convert=negate,
    )
    reset_position_ids: bool = flag_field(
        False,
        "restart position ids after each end-of-document token (megatron-core's dataset; as in "
        "Megatron-LM, only learned absolute position embeddings read them, RoPE does not)",
    )
    eod_mask_loss: bool = flag_field(
        False, "no loss on end-of-document tokens (megatron-core's dataset)"
    )
    create_attention_mask_in_dataloader: bool = flag_field(
        True,
        "accepted for Megatron-LM's scripts; the dense mask is never built here (the model "
        "uses the causal mask, which equals the dataset's without --reset-attention-mask)",
        flag="--no-create-attention-mask-in-dataloader",
        dest="no_create_attention_mask_in_dataloader",
        convert=negate,
    )
    # end of the data-path fields
    data_cache_dir: str = flag_field("data_cache", "embedded corpus cache")
    # tokenizer (H3: these fields stay together; Megatron-LM's names and meanings)
    tokenizer_type: str | None = flag_field(
        None,
        "Megatron-LM's tokenizer type, built through megatron-core's tokenizer library: "
        "HuggingFaceTokenizer (--tokenizer-model: a local tokenizer directory), "
        "GPT2BPETokenizer (--vocab-file, --merge-file), SentencePieceTokenizer / "
        "GPTSentencePieceTokenizer / Llama2Tokenizer (--tokenizer-model: a .model file), "
        "NullTokenizer (--vocab-size ids + EOD), TikTokenizer (--tokenizer-model: a tiktoken "
        "vocabulary .json; --tiktoken-* flags; pip install 'megatron-wsm[tiktoken]'); default: "
        "our own sentencepiece wrapper of --tokenizer-model or of the built-in corpus "
        "(docs/data.md)",
        choices=[*TOKENIZER_TYPES, *UNSUPPORTED_TOKENIZER_TYPES],
    )
    tokenizer_model: str | None = flag_field(
        None,
        "sentencepiece .model file, or with --tokenizer-type HuggingFaceTokenizer a local "
        "Hugging Face tokenizer directory, with TikTokenizer a tiktoken vocabulary .json",
    )
    vocab_file: str | None = flag_field(None, "GPT2BPETokenizer: the vocab.json file")
    merge_file: str | None = flag_field(None, "GPT2BPETokenizer: the merges.txt file")
    vocab_size: int = flag_field(
        DEFAULT_VOCAB_SIZE,
        "built-in corpus: the vocabulary of the tokenizer trained on it; NullTokenizer: ids "
        "before EOD (Megatron-LM's meaning: the model gets vocab size + 1 ids, then padding); "
        "TikTokenizer: special tokens + ranks (Megatron-LM's meaning; the default 4096 counts as "
        "not given: 2**17, or the file's size when smaller)",
    )
    make_vocab_size_divisible_by: int = flag_field(
        128,
        "pad the vocabulary to a multiple of this times the tensor-parallel size "
        "(Megatron-LM's padding)",
    )
    #: The embedding's rows of the checkpoint a tool reads the model from (Megatron-LM's
    #: ``args.padded_vocab_size``, which ``--use-checkpoint-args`` copies): set by
    #: tools/evaluate.py, so a checkpoint written at another TP size keeps its global shapes.
    #: None: padded for this run's TP (model/vocab.py).
    padded_vocab_size: int | None = flag_field(None, flag=None)
    tokenizer_hf_use_fast: bool = flag_field(
        False, "HuggingFaceTokenizer: load the fast tokenizer (Megatron-LM's flag)"
    )
    tokenizer_hf_include_special_tokens: bool = flag_field(
        False,
        "HuggingFaceTokenizer: text to ids adds the tokenizer's special tokens (e.g. BOS), "
        "as Megatron-LM's flag",
    )
    tiktoken_pattern: str | None = flag_field(
        None,
        "TikTokenizer: the pre-tokenizer regex, v1 or v2 (Megatron-LM's flag; default v2, "
        "megatron-core's)",
        choices=list(TIKTOKEN_PATTERNS),
    )
    tiktoken_num_special_tokens: int = flag_field(
        1000,
        "TikTokenizer: ids 0..N-1 are special tokens, the vocabulary's ranks follow "
        "(Megatron-LM's flag and default)",
    )
    tokenizer_special_tokens: list[str] | None = flag_field(
        None,
        "TikTokenizer: the named special tokens (ids 0, 1, ...; must include <unk> <s> </s> "
        "<mask> <pad> <cls> <sep>, megatron-core's default list; </s> is the EOD)",
        nargs="+",
    )
    tiktoken_special_tokens: list[str] | None = flag_field(
        None,
        "Megatron-LM's deprecated name of --tokenizer-special-tokens (used when that is not given)",
        nargs="+",
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
        if not self.uses_builtin_corpus() and self.data_source != "embedded":
            raise ConfigError(
                f"--data-source {self.data_source} selects a built-in corpus; "
                f"{'--mock-data' if self.mock_data else '--data-path'} replaces it (give one "
                "of the two)"
            )
        if self.data_max_bytes is not None:
            if self.data_source != "env-python":
                raise ConfigError("--data-max-bytes applies to --data-source env-python only")
            if self.data_max_bytes <= 0:
                raise ConfigError(f"--data-max-bytes must be positive, got {self.data_max_bytes}")
        files = self.validate_data_paths()
        self.validate_tokenizer()
        if self.tokenizer_type is not None and not files and not self.mock_data:
            raise ConfigError(
                f"--tokenizer-type {self.tokenizer_type} needs --data-path (data made with that "
                "tokenizer) or --mock-data; the built-in corpus brings its own tokenizer"
            )
        if files and self.tokenizer_model is None and self.tokenizer_type is None:
            raise ConfigError(
                "--data-path needs the tokenizer that made the data: --tokenizer-model, or "
                "--tokenizer-type with its files"
            )
        if self.mock_data and self.tokenizer_model is None and self.tokenizer_type is None:
            raise ConfigError(
                "--mock-data needs a tokenizer (megatron-core's mock documents end with its EOD "
                "id): e.g. --tokenizer-type NullTokenizer --vocab-size N"
            )

    # data paths (H4)
    def __post_init__(self) -> None:
        # Manifests written before --data-path took Megatron-LM's word list hold one string.
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]

    def _data_flags(self) -> list[tuple[str, bool]]:
        per_split = any(
            v is not None for v in (self.train_data_path, self.valid_data_path, self.test_data_path)
        )
        return [
            ("--mock-data", self.mock_data),
            ("--data-path", self.data_path is not None),
            ("--data-args-path", self.data_args_path is not None),
            ("--train/valid/test-data-path", per_split),
            ("--per-split-data-args-path", self.per_split_data_args_path is not None),
        ]

    def uses_builtin_corpus(self) -> bool:
        """No data flag: the run trains on ``--data-source``."""
        return not any(given for _, given in self._data_flags())

    def describe_source(self) -> str:
        """The data flags in a line (for messages and the log)."""
        if self.mock_data:
            return "mock data (megatron-core's MockGPTDataset)"
        if self.data_path is not None:
            return "--data-path " + " ".join(self.data_path)
        if self.data_args_path is not None:
            return f"--data-args-path {self.data_args_path}"
        if self.per_split_data_args_path is not None:
            return f"--per-split-data-args-path {self.per_split_data_args_path}"
        return "; ".join(
            f"--{name}-data-path {' '.join(words)}"
            for name, words in (
                ("train", self.train_data_path),
                ("valid", self.valid_data_path),
                ("test", self.test_data_path),
            )
            if words is not None
        )

    def validate_data_paths(self) -> bool:
        """One data source, Megatron-LM's rules, every file present; True when data files are
        given (not the built-in corpus, not mock data)."""
        from megatron_wsm.config.blends import blends_from_flags

        flags = self._data_flags()
        per_split = flags[3][1]
        sources = [name for name, given in flags if given]
        if len(sources) > 1:
            raise ConfigError(f"give one data source, not {' and '.join(sources)}")
        if self.num_dataset_builder_threads < 1:
            raise ConfigError(
                "--num-dataset-builder-threads must be >= 1, got "
                f"{self.num_dataset_builder_threads}"
            )
        if self.split is not None and (per_split or self.per_split_data_args_path is not None):
            raise ConfigError(
                "--split cuts --data-path datasets; per-split paths are whole splits already"
            )
        blend, blend_per_split = blends_from_flags(self)
        return blend is not None or blend_per_split is not None

    # tokenizer (H3)
    def given_vocab_size(self) -> int | None:
        """``--vocab-size`` as the tokenizer reads it: None for TikTokenizer at this trainer's
        default (Megatron-LM has no default there; see ``data/tokenizers.py``)."""
        if self.tokenizer_type == "TikTokenizer" and self.vocab_size == DEFAULT_VOCAB_SIZE:
            return None
        return self.vocab_size

    def special_tokens(self) -> list[str] | None:
        """``--tokenizer-special-tokens``, else its deprecated ``--tiktoken-special-tokens``
        (Megatron-LM's ``validate_args`` copies the second into the first)."""
        return self.tokenizer_special_tokens or self.tiktoken_special_tokens

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
        if kind not in ("GPT2BPETokenizer", "HuggingFaceTokenizer") and (
            self.vocab_file is not None or self.merge_file is not None
        ):
            raise ConfigError(
                "--vocab-file / --merge-file belong to --tokenizer-type GPT2BPETokenizer (or "
                "HuggingFaceTokenizer); give that type"
            )
        if kind != "TikTokenizer" and self.special_tokens() is not None:
            raise ConfigError(
                "--tokenizer-special-tokens / --tiktoken-special-tokens are wired for "
                "--tokenizer-type TikTokenizer only"
            )
        if kind == "TikTokenizer":
            self._validate_tiktoken()
        elif kind == "NullTokenizer":
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
            model = self.tokenizer_model
            if os.path.isfile(model) or not (os.path.isdir(model) or HF_REPO_ID.match(model)):
                raise ConfigError(
                    f"--tokenizer-model {self.tokenizer_model}: not a directory (a "
                    "HuggingFaceTokenizer is read from a local directory with tokenizer.json / "
                    "tokenizer_config.json, or a hub id from the local Hugging Face cache)"
                )
        elif kind is not None or self.tokenizer_model is not None:
            if self.tokenizer_model is None:
                raise ConfigError(f"--tokenizer-type {kind} needs {TOKENIZER_TYPES[str(kind)]}")
            if not os.path.isfile(self.tokenizer_model):
                raise ConfigError(f"--tokenizer-model {self.tokenizer_model}: file not found")

    def _validate_tiktoken(self) -> None:
        # Light checks only (the package, the file, the numbers): the vocabulary itself is read
        # and checked when the tokenizer is built (data/tokenizers.py).
        import importlib.util

        if importlib.util.find_spec("tiktoken") is None:
            raise ConfigError(
                "--tokenizer-type TikTokenizer needs the tiktoken package: "
                "pip install 'megatron-wsm[tiktoken]' (or pip install tiktoken)"
            )
        if self.tokenizer_model is None:
            raise ConfigError(
                f"--tokenizer-type TikTokenizer needs {TOKENIZER_TYPES['TikTokenizer']}"
            )
        if not os.path.isfile(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {self.tokenizer_model}: file not found")
        if not self.tokenizer_model.endswith(".json"):
            raise ConfigError(
                f"--tokenizer-model {self.tokenizer_model}: a tiktoken vocabulary is a .json file"
            )
        if self.tiktoken_pattern not in (None, *TIKTOKEN_PATTERNS):
            raise ConfigError(f"--tiktoken-pattern {self.tiktoken_pattern!r}: choose v1 or v2")
        if self.tiktoken_num_special_tokens < 1:
            raise ConfigError(
                "--tiktoken-num-special-tokens must be positive, got "
                f"{self.tiktoken_num_special_tokens}"
            )
