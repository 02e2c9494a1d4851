"""Where training tokens come from: :class:`DataConfig` (tokenizer and datasets)."""

from __future__ import annotations

import dataclasses
import os

from megatron_wsm.config.fields import ConfigError, flag_field

#: Built-in corpora selectable with ``--data-source`` (``megatron_wsm.data``: ``corpus.py``,
#: ``env_python.py``).
DATA_SOURCES = ("embedded", "env-python")


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
    tokenizer_model: str | None = flag_field(None, "sentencepiece .model file")
    data_cache_dir: str = flag_field("data_cache", "embedded corpus cache")
    vocab_size: int = flag_field(4096, "embedded tokenizer vocabulary")
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
        if path is not None and self.tokenizer_model is None:
            raise ConfigError("--data-path needs --tokenizer-model (the model that made the data)")
        if self.tokenizer_model is not None and not os.path.isfile(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {self.tokenizer_model}: file not found")
