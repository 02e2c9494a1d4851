"""``--tokenizer-type`` through megatron-core's tokenizer library, Megatron-LM's vocabulary
padding and EOD ids, and the refusals (megatron_wsm/data/tokenizers.py)."""

from __future__ import annotations

import pickle

import megatron_wsm.mcore_prelude  # noqa: F401

import pytest

from megatron_wsm.config import ConfigError
from megatron_wsm.data.tokenizers import (
    TokenizerError,
    build_tokenizer,
    megatron_vocab_size,
    tokenizer_from_config,
)
from megatron_wsm.model import padded_vocab_size
from megatron_wsm.testing.config import tiny_run_config


def test_null_tokenizer_is_megatron_lm_s_vocab_plus_eod() -> None:
    tok = build_tokenizer("NullTokenizer", vocab_size=511)
    assert (tok.vocab_size, tok.eod) == (512, 511)
    assert tok.tokenize("3 7 510") == [3, 7, 510]
    assert megatron_vocab_size("NullTokenizer", tok) == 512
    # pickles (DataLoader workers, spawn): the same ids after the round trip
    assert pickle.loads(pickle.dumps(tok)).eod == 511


@pytest.mark.parametrize(
    ("vocab", "multiple", "tp", "padded"),
    [
        (512, 128, 1, 512),
        (512, 128, 2, 512),
        (513, 128, 1, 640),
        (513, 128, 2, 768),
        (512, 100, 1, 600),
        (4096, 128, 1, 4096),
        (50257, 128, 1, 50304),
        (50257, 1, 1, 50257),
    ],
)
def test_padding_is_megatron_lm_s(vocab: int, multiple: int, tp: int, padded: int) -> None:
    # Megatron-LM's _vocab_size_with_padding: ceil(vocab / (multiple * tp)) * multiple * tp
    assert padded_vocab_size(vocab, tp, multiple) == padded


def test_flags_reach_the_config_and_the_tokenizer() -> None:
    cfg = tiny_run_config(
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        511,
        "--make-vocab-size-divisible-by",
        64,
    )
    d = cfg.data
    assert (d.tokenizer_type, d.vocab_size, d.make_vocab_size_divisible_by) == (
        "NullTokenizer",
        511,
        64,
    )
    assert tokenizer_from_config(d).vocab_size == 512
    # the default stays Megatron-LM's 128 and no type (our sentencepiece wrapper)
    default = tiny_run_config().data
    assert (default.tokenizer_type, default.make_vocab_size_divisible_by) == (None, 128)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokenizer-type", "BertWordPieceCase"], "BERT/T5 tokenizer"),
        (["--tokenizer-type", "TikTokenizer"], "tiktoken"),
        (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
        (["--tokenizer-type", "Llama2Tokenizer"], "needs --tokenizer-model"),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "0"], "positive"),
        (["--make-vocab-size-divisible-by", "0"], ">= 1"),
    ],
)
def test_config_refuses_with_the_reason(flags: list[str], message: str) -> None:
    cfg = tiny_run_config(*flags)
    with pytest.raises(ConfigError, match=message):
        cfg.data.validate()


def test_a_tokenizer_type_needs_data_made_with_it(tmp_path) -> None:
    cfg = tiny_run_config("--tokenizer-type", "NullTokenizer", "--vocab-size", 511)
    with pytest.raises(ConfigError, match="needs --data-path"):
        cfg.data.validate()


def test_build_refuses_missing_files_and_hub_names(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="file not found"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "none.model"))
    with pytest.raises(TokenizerError, match="not a directory"):
        build_tokenizer("HuggingFaceTokenizer", "gpt2")
    with pytest.raises(TokenizerError, match="file not found"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=str(tmp_path / "v.json"), merge_file=str(tmp_path / "m")
        )
