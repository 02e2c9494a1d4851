"""``--tokenizer-type`` through megatron-core's tokenizer library, Megatron-LM's vocabulary
padding and EOD ids, and the refusals (megatron_wsm/data/tokenizers.py)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401

import numpy as np
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


# -- the reference tokenizers of tests/data/megatron_lm/preprocess ------------------------------
REF = Path(__file__).resolve().parents[1] / "data" / "megatron_lm" / "preprocess"
SPM = str(REF / "spm.model")


@pytest.mark.parametrize(
    ("kind", "kwargs", "vocab", "megatron_vocab", "eod"),
    [
        # Megatron-LM core_v0.16.1 legacy tokenizers (what its padding reads) give, on these
        # files: _SentencePieceTokenizer 404 (400 + <CLS> <SEP> <EOD> <MASK>),
        # _GPTSentencePieceTokenizer / _Llama2Tokenizer 400, _GPT2BPETokenizer and
        # _HuggingFaceTokenizer 420; the data EOD is megatron-core's (the eos id / <|endoftext|>).
        ("SentencePieceTokenizer", {"tokenizer_model": SPM}, 400, 404, 2),
        ("GPTSentencePieceTokenizer", {"tokenizer_model": SPM}, 400, 400, 2),
        ("Llama2Tokenizer", {"tokenizer_model": SPM}, 400, 400, 2),
        (
            "GPT2BPETokenizer",
            {"vocab_file": str(REF / "gpt2" / "vocab.json"),
             "merge_file": str(REF / "gpt2" / "merges.txt")},
            420, 420, 0,
        ),
        ("HuggingFaceTokenizer", {"tokenizer_model": str(REF / "hf")}, 420, 420, 0),
        (None, {"tokenizer_model": SPM}, 400, 400, 2),
    ],
)  # fmt: skip
def test_vocab_and_eod_as_megatron_lm(
    kind: str | None, kwargs: dict, vocab: int, megatron_vocab: int, eod: int
) -> None:
    tok = build_tokenizer(kind, **kwargs)
    assert (tok.vocab_size, megatron_vocab_size(kind, tok), tok.eod) == (vocab, megatron_vocab, eod)
    assert padded_vocab_size(megatron_vocab, 1) == 512
    ids = tok.tokenize("def f(x):\n    return x")
    assert ids and tok.eod not in ids
    # pickles (DataLoader workers) and tokenizes the same afterwards
    assert pickle.loads(pickle.dumps(tok)).tokenize("def f(x):\n    return x") == ids


def test_legacy_sentencepiece_count_without_pad_piece(tmp_path: Path) -> None:
    """A model without a pad piece but with <MASK>: Megatron-LM's legacy wrapper adds <CLS>
    <SEP> <EOD> <PAD> (measured: 404 for this 400-piece model)."""
    from megatron_wsm.data.spm_training import train_sentencepiece

    lines = (REF / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [t for t in (json.loads(line)["text"] for line in lines) if isinstance(t, str)] * 4
    model = train_sentencepiece(
        texts, tmp_path / "nopad", vocab_size=400,
        extra_options={"pad_id": -1, "user_defined_symbols": ["\n", "<MASK>"]},
    )  # fmt: skip
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert (tok.vocab_size, megatron_vocab_size("SentencePieceTokenizer", tok)) == (400, 404)


# -- hostile tokenizer directories --------------------------------------------------------------
def _remote_code_dir(root: Path, marker: Path, with_fast_fallback: bool) -> Path:
    d = root / ("fallback" if with_fast_fallback else "remote")
    d.mkdir()
    (d / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = {
        "auto_map": {
            "AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]
        },
        "tokenizer_class": "PreTrainedTokenizerFast" if with_fast_fallback else "EvilTokenizer",
        "eos_token": "<|endoftext|>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if with_fast_fallback:
        shutil.copy(REF / "hf" / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.mark.parametrize("with_fast_fallback", [False, True])
def test_auto_map_code_is_never_run(tmp_path: Path, with_fast_fallback: bool) -> None:
    """A tokenizer directory whose config points at its own Python file: loading it runs
    nothing (trust_remote_code=False); it is refused, or loaded with the built-in class."""
    marker = tmp_path / "ran.txt"
    d = _remote_code_dir(tmp_path, marker, with_fast_fallback)
    try:
        tok = build_tokenizer("HuggingFaceTokenizer", str(d))
    except TokenizerError as err:
        assert not with_fast_fallback
        assert "trust_remote_code" in str(err) or "EvilTokenizer" in str(err)
    else:
        assert with_fast_fallback, "the custom class cannot load without its code"
        assert tok.tokenize("def f") and tok.eod == 0
    assert not marker.exists(), "code from the tokenizer directory ran"


# -- a Hugging Face tokenizer directory end to end, offline -------------------------------------
def test_hf_directory_preprocess_train_and_tokenizer_export_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local tokenizer directory → tools/preprocess_data.py (in-process here; a fresh offline
    process in test_preprocess_parity.py) → pretrain_moe.py (1 process, offline) →
    the tokenizer written for transformers from the checkpoint's recorded flags, with
    HF_HUB_OFFLINE=1, then tools/export_hf.py, which writes that tokenizer beside the model:
    the exported directory's AutoTokenizer gives the training ids."""
    import subprocess
    import sys
    from pydoc_data.topics import topics

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_wsm.checkpoint.manager import resolve_load_dir
    from megatron_wsm.checkpoint.manifest import read_manifest
    from megatron_wsm.config import RunConfig
    from megatron_wsm.data.tokenizers import save_for_transformers
    from megatron_wsm.testing.config import TINY_MODEL
    from megatron_wsm.testing.launch import ROOT, run_pretrain

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": topics[k][:1000]}) + "\n" for k in sorted(topics)[:60])
    )
    tok_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(REF / "hf")]
    from megatron_wsm.cli.preprocess_data import main as preprocess

    argv = ["--input", str(docs), "--output-prefix", str(tmp_path / "data" / "docs")]
    assert preprocess([*argv, "--append-eod", "--quiet", *tok_flags]) == 0
    prefix = tmp_path / "data" / "docs_text_document"
    tok = build_tokenizer("HuggingFaceTokenizer", str(REF / "hf"))
    first = json.loads(docs.read_text().splitlines()[0])["text"]
    ds = IndexedDataset(str(prefix))
    assert ds[0].tolist() == [*tok.tokenize(first), tok.eod]

    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", 3, "--data-path", prefix, "--split", "90,5,5",
         *tok_flags, "--save", tmp_path / "ckpt", "--save-interval", 3],
        tmp_path / "result.json",
    )  # fmt: skip
    assert all(np.isfinite(h["loss"]) for h in result["train_history"])
    ckpt = resolve_load_dir(tmp_path / "ckpt")
    manifest = read_manifest(ckpt)
    assert manifest is not None
    run = RunConfig.from_json(manifest.run_info())
    assert (run.data.tokenizer_type, run.model.vocab_size) == ("HuggingFaceTokenizer", 420)
    assert manifest.model_config["padded_vocab_size"] == 512

    # the run's tokenizer, rebuilt from the checkpoint's flags, for transformers
    rebuilt = tokenizer_from_config(run.data)
    assert save_for_transformers("HuggingFaceTokenizer", rebuilt, tmp_path / "hf_tok") == 420
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf_tok"))
    assert auto(first, add_special_tokens=False)["input_ids"] == ds[0].tolist()[:-1]
    assert auto.eos_token_id == tok.eod

    export = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_hf.py"), "--load", str(tmp_path / "ckpt"),
         "--save", str(tmp_path / "hf_model")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf_model")
    assert exported(first, add_special_tokens=False)["input_ids"] == ds[0].tolist()[:-1]


def test_checkpoint_args_carry_the_tokenizer_flags_under_megatron_lm_names() -> None:
    """What Megatron-LM's loader reads back (``--use-checkpoint-args``): the type, its files,
    ``--vocab-size`` only for NullTokenizer (its meaning there) and the padding multiple."""
    from megatron_wsm.checkpoint.megatron_args import megatron_lm_args

    sizes = (
        "tensor_model_parallel",
        "pipeline_model_parallel",
        "expert_model_parallel",
        "data_parallel",
    )
    layout = {**{f"{name}_size": 1 for name in sizes}, "world_size": 1}

    def args(*flags: str | int):
        run = tiny_run_config(*flags).to_json()
        run["model"]["vocab_size"] = 512  # set from the tokenizer by the trainer
        return megatron_lm_args(
            run, iteration=1, consumed_samples=4, padded_vocab_size=512, parallel=layout
        )

    a = args("--tokenizer-type", "NullTokenizer", "--vocab-size", 511,
             "--make-vocab-size-divisible-by", 64)  # fmt: skip
    assert (a.tokenizer_type, a.vocab_size, a.make_vocab_size_divisible_by) == (
        "NullTokenizer", 511, 64,
    )  # fmt: skip
    g = args("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json",
             "--merge-file", "m.txt")  # fmt: skip
    assert (g.tokenizer_type, g.vocab_file, g.merge_file, g.vocab_size) == (
        "GPT2BPETokenizer", "v.json", "m.txt", 512,
    )  # fmt: skip
    assert args().tokenizer_type == "SentencePieceTokenizer"  # our default, as before


def test_hub_id_is_read_from_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tokenizer-model org/name`` (Megatron-LM scripts' form): the local Hugging Face cache's
    copy is used; a tokenizer missing from the cache is refused, nothing is downloaded."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tok" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF / "hf" / name, snapshot / name)
    (hub / "models--org--tok" / "refs").mkdir()
    (hub / "models--org--tok" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    cached = build_tokenizer("HuggingFaceTokenizer", "org/tok")
    local = build_tokenizer("HuggingFaceTokenizer", str(REF / "hf"))
    text = "def f(x):\n    return x"
    assert cached.tokenize(text) == local.tokenize(text) and cached.eod == local.eod
    with pytest.raises(TokenizerError, match="local Hugging Face cache"):
        build_tokenizer("HuggingFaceTokenizer", "org/missing")
    # the config accepts the hub-id form and refuses other non-directories before any start
    ok = tiny_run_config("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "org/tok")
    ok.data.validate_tokenizer()
    bad = tiny_run_config(
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "none")
    )
    with pytest.raises(ConfigError, match="not a directory"):
        bad.data.validate_tokenizer()


def test_vocab_and_merge_files_need_their_type() -> None:
    cfg = tiny_run_config("--vocab-file", "v.json", "--merge-file", "m.txt")
    with pytest.raises(ConfigError, match="belong to --tokenizer-type GPT2BPETokenizer"):
        cfg.data.validate_tokenizer()
