"""``--tokenizer-type TikTokenizer``: megatron-core's tiktoken tokenizer with Megatron-LM's
flags (megatron_wsm/data/tokenizers.py), its preprocess parity with Megatron-LM's own tool, the
refusals of hostile vocabulary files and of a missing ``tiktoken`` package, and a training run.

The vocabulary (``tests/data/megatron_lm/preprocess/tiktoken/vocab.json``: 256 bytes + 44
merges) and Megatron-LM's outputs are made by ``make_tiktoken.py`` there (README)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401

import numpy as np
import pytest

from megatron_wsm.cli.preprocess_data import main as preprocess
from megatron_wsm.config import ConfigError
from megatron_wsm.data import tokenizers
from megatron_wsm.data.tokenizers import (
    TokenizerError,
    build_tokenizer,
    megatron_vocab_size,
    tokenizer_from_config,
)
from megatron_wsm.model import padded_vocab_size
from megatron_wsm.testing.config import tiny_run_config

REF = Path(__file__).resolve().parents[1] / "data" / "megatron_lm" / "preprocess"
VOCAB = str(REF / "tiktoken" / "vocab.json")
#: The reference run's flags (make_tiktoken.TIKTOKEN_FLAGS): 16 special tokens + 300 ranks.
FLAGS = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "tiktoken/vocab.json",
         "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "16",
         "--vocab-size", "316"]  # fmt: skip
TEXT = "def f(x):\n    return x  # naïve café ✓"


def _tok(**kwargs):
    return build_tokenizer("TikTokenizer", VOCAB, **{"tiktoken_num_special_tokens": 16, **kwargs})


# -- preprocess parity with Megatron-LM's tools/preprocess_data.py ------------------------------
@pytest.mark.parametrize(
    ("name", "source"), [("tiktoken", "corpus"), ("tiktoken_specials", "tiktoken/specials")]
)
def test_preprocess_same_bytes_as_megatron_lm(tmp_path: Path, name: str, source: str) -> None:
    argv = ["--input", f"{source}.jsonl", "--output-prefix", str(tmp_path / name),
            "--workers", "1", "--append-eod", *FLAGS, "--quiet"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(REF)  # the reference command's relative paths
    try:
        assert preprocess(argv) == 0
    finally:
        os.chdir(cwd)
    for ext in (".bin", ".idx"):
        want = (REF / "megatron_lm" / f"{name}_text_document{ext}").read_bytes()
        assert (tmp_path / f"{name}_text_document{ext}").read_bytes() == want, ext


def test_reference_is_not_trivial() -> None:
    """The reference holds merged tokens (ids beyond the 16 + 256 specials and bytes), and the
    special-token strings of its second input became special ids, "</s>" the EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(REF / "megatron_lm" / "tiktoken_text_document"))
    corpus = np.concatenate([ds[i] for i in range(len(ds))])
    assert corpus.max() >= 16 + 256 and (corpus == 2).sum() >= 10
    specials = IndexedDataset(str(REF / "megatron_lm" / "tiktoken_specials_text_document"))
    first, second = specials[0].tolist(), specials[1].tolist()
    assert first.count(2) == 2  # "</s>" in the text, then the appended EOD
    assert {9, 3, 0} <= set(second)  # <SPECIAL_9>, <mask>, <unk>


# -- the tokenizer ------------------------------------------------------------------------------
def test_ids_vocab_and_padding_as_megatron_lm() -> None:
    tok = _tok(vocab_size=316, tiktoken_pattern="v2")
    # vocabulary = special tokens + ranks (Megatron-LM's --vocab-size), EOD = "</s>" = id 2
    assert (tok.vocab_size, megatron_vocab_size("TikTokenizer", tok), tok.eod) == (316, 316, 2)
    assert padded_vocab_size(316, 1) == 384 and padded_vocab_size(316, 2) == 512
    ids = tok.tokenize(TEXT)
    assert ids and min(ids) >= 16 and max(ids) < 316 and any(i >= 16 + 256 for i in ids)
    # rank r is id r + 16: the single bytes of "d" and "\n"
    assert tok.tokenize("d") == [16 + ord("d")] and tok.tokenize("\n") == [16 + 10]
    assert pickle.loads(pickle.dumps(tok)).tokenize(TEXT) == ids  # DataLoader workers
    # without --vocab-size: the file's size (Megatron-LM's 2**17 needs more ranks than it has)
    assert _tok().vocab_size == 316
    assert _tok(tiktoken_pattern="v1").tokenize(TEXT) != []


def test_vocab_size_cuts_the_ranks_as_megatron_lm() -> None:
    cut = _tok(vocab_size=290)  # 274 ranks: the 256 bytes and the first 18 merges
    ids = cut.tokenize(TEXT)
    assert cut.vocab_size == 290 and max(ids) < 290
    assert len(ids) >= len(_tok(vocab_size=316).tokenize(TEXT))
    with pytest.raises(TokenizerError, match="300 ranks, fewer than --vocab-size 400"):
        _tok(vocab_size=400)
    with pytest.raises(TokenizerError, match="must exceed --tiktoken-num-special-tokens"):
        _tok(vocab_size=16)


def test_special_tokens_flags() -> None:
    order = ["<s>", "</s>", "<unk>", "<mask>", "<pad>", "<cls>", "<sep>", "<x>"]
    tok = _tok(tokenizer_special_tokens=order)
    assert tok.eod == 1 and tok.tokenize("a<x>") == [16 + ord("a"), 7]
    with pytest.raises(TokenizerError, match="missing: <cls> <sep>"):
        _tok(tokenizer_special_tokens=["<unk>", "<s>", "</s>", "<mask>", "<pad>"])
    with pytest.raises(TokenizerError, match="repeated"):
        _tok(tokenizer_special_tokens=[*order, "<x>"])
    with pytest.raises(TokenizerError, match="fewer than the 8 special tokens"):
        _tok(tokenizer_special_tokens=order, tiktoken_num_special_tokens=7)


# -- hostile vocabulary files -------------------------------------------------------------------
def _entries(n: int = 260) -> list[dict]:
    toks = [bytes([i]) for i in range(256)] + [b"ab", b"cd", b"abcd", b" x"][: n - 256]
    return [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": "?"}
            for i, t in enumerate(toks)]  # fmt: skip


def _bad(kind: str) -> object:
    e = _entries()
    if kind == "object":
        return {"vocab": e}
    if kind == "keys":
        e[3] = {"rank": 3, "token_bytes": e[3]["token_bytes"]}
    elif kind == "rank_str":
        e[5]["rank"] = "5"
    elif kind == "rank_bool":
        e[1]["rank"] = True
    elif kind == "rank_order":
        e[257]["rank"] = 300
    elif kind == "base64":
        e[258]["token_bytes"] = "not base64!"
    elif kind == "bytes_type":
        e[258]["token_bytes"] = [1, 2]
    elif kind == "first_256":
        e[65]["token_bytes"] = base64.b64encode(b"B").decode()
    elif kind == "repeat":
        e[259]["token_bytes"] = e[256]["token_bytes"]
    elif kind == "entry":
        e[10] = "x"
    return e


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("object", "a JSON list"),
        ("keys", "entry 3 is not an object with exactly the keys"),
        ("rank_str", "entry 5 has rank '5'"),
        ("rank_bool", "entry 1 has rank True"),
        ("rank_order", "entry 257 has rank 300"),
        ("base64", "entry 258: token_bytes is not base64"),
        ("bytes_type", "entry 258: token_bytes and token_str must be strings"),
        ("first_256", "entry 65 must be the single byte 65"),
        ("repeat", "entry 259: an empty or repeated token"),
        ("entry", "entry 10 is not an object"),
    ],
)
def test_hostile_vocabulary_is_refused(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(_bad(kind)))
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer("TikTokenizer", str(path), tiktoken_num_special_tokens=16)


def test_bad_json_huge_and_wrong_suffix_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.json"
    for text in ("[{", "\xff\xfe", "[" * 100_000 + "]" * 100_000):
        bad.write_bytes(text.encode("latin-1"))
        with pytest.raises(TokenizerError, match="not a valid JSON file"):
            build_tokenizer("TikTokenizer", str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_entries()))
    assert build_tokenizer("TikTokenizer", str(good), tiktoken_num_special_tokens=8).vocab_size == (
        268
    )
    monkeypatch.setattr(tokenizers, "TIKTOKEN_MAX_FILE_BYTES", 1000)
    with pytest.raises(TokenizerError, match="more than the 1000 read"):
        build_tokenizer("TikTokenizer", str(good))
    with pytest.raises(TokenizerError, match="is a .json file"):
        build_tokenizer("TikTokenizer", str(REF / "spm.model"))
    with pytest.raises(TokenizerError, match="file not found"):
        build_tokenizer("TikTokenizer", str(tmp_path / "none.json"))


# -- flags and the missing package --------------------------------------------------------------
def test_flags_reach_the_config_and_the_tokenizer() -> None:
    cfg = tiny_run_config("--tokenizer-type", "TikTokenizer", "--tokenizer-model", VOCAB,
                          "--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", 16,
                          "--vocab-size", 300,
                          "--tiktoken-special-tokens", "<unk>", "<s>", "</s>", "<mask>",
                          "<pad>", "<cls>", "<sep>", "<x>")  # fmt: skip
    d = cfg.data
    d.validate_tokenizer()
    assert (d.tiktoken_pattern, d.tiktoken_num_special_tokens, d.given_vocab_size()) == (
        "v1", 16, 300,
    )  # fmt: skip
    tok = tokenizer_from_config(d)  # the deprecated --tiktoken-special-tokens is the list
    assert (tok.vocab_size, tok.tokenize("<x>")) == (300, [7])
    # Megatron-LM's defaults; --vocab-size at this trainer's default counts as not given
    default = tiny_run_config("--tokenizer-type", "TikTokenizer", "--vocab-size", 4096).data
    assert (default.tiktoken_pattern, default.tiktoken_num_special_tokens) == (None, 1000)
    assert default.given_vocab_size() is None
    with pytest.raises(ConfigError, match="TikTokenizer only"):
        tiny_run_config("--tokenizer-special-tokens", "<unk>").data.validate_tokenizer()
    with pytest.raises(ConfigError, match="a tiktoken vocabulary is a .json file"):
        tiny_run_config("--tokenizer-type", "TikTokenizer", "--tokenizer-model",
                        str(REF / "spm.model")).data.validate_tokenizer()  # fmt: skip


def test_missing_tiktoken_is_refused_before_any_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch.distributed as dist

    from megatron_wsm.pretrain import main as pretrain

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` fails, find_spec None
    hint = "pip install 'megatron-wsm\\[tiktoken\\]'"
    with pytest.raises(TokenizerError, match=hint):
        _tok()
    cfg = tiny_run_config("--tokenizer-type", "TikTokenizer", "--tokenizer-model", VOCAB)
    with pytest.raises(ConfigError, match=hint):
        cfg.data.validate_tokenizer()
    assert not dist.is_initialized()
    data = tmp_path / "d_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(REF / "megatron_lm" / f"tiktoken_text_document{ext}", f"{data}{ext}")
    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "16", "--train-iters", "1", "--data-path", str(data),
            "--tokenizer-type", "TikTokenizer", "--tokenizer-model", VOCAB,
            "--save", str(tmp_path / "ckpt")]  # fmt: skip
    assert pretrain(argv) == 2
    assert "pip install 'megatron-wsm[tiktoken]'" in capsys.readouterr().err
    assert not dist.is_initialized() and not (tmp_path / "ckpt").exists()
    cwd = os.getcwd()
    os.chdir(REF)
    try:
        out = tmp_path / "p"
        assert preprocess(["--input", "corpus.jsonl", "--output-prefix", str(out), *FLAGS]) == 2
    finally:
        os.chdir(cwd)
    assert "pip install 'megatron-wsm[tiktoken]'" in capsys.readouterr().err
    assert not list(tmp_path.glob("p_*"))


def test_preprocess_refuses_the_deprecated_special_tokens_name(tmp_path: Path, capsys) -> None:
    """Megatron-LM's tool ignores --tiktoken-special-tokens (only its trainer maps it), so
    taking it would write other data than Megatron-LM's: refused with the flag to use."""
    argv = ["--input", str(REF / "corpus.jsonl"), "--output-prefix", str(tmp_path / "x"),
            "--tokenizer-type", "TikTokenizer", "--tokenizer-model", VOCAB,
            "--tiktoken-special-tokens", "<unk>", "<s>", "</s>"]  # fmt: skip
    assert preprocess(argv) == 2
    assert "give --tokenizer-special-tokens" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# -- the tokenizer written for transformers, training, export ------------------------------------
def _texts() -> list[str]:
    texts: list[str] = []
    for path in (REF / "corpus.jsonl", REF / "tiktoken" / "specials.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            texts.extend(text if isinstance(text, list) else [text])
    rng = np.random.default_rng(0)
    alphabet = list("abc XYZ019 \n\t.,;:!?'\"-_()<>/\\éü日本✓") + ["</s>", "<mask>", "  ", "\r\n"]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(1, 80)))) for _ in range(200)]
    return texts


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_written_for_transformers_gives_the_same_ids(tmp_path: Path, pattern: str) -> None:
    from transformers import AutoTokenizer

    from megatron_wsm.data.tokenizers import save_for_transformers

    tok = _tok(tiktoken_pattern=pattern)
    assert save_for_transformers("TikTokenizer", tok, tmp_path) == 316
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.eos_token_id, auto.bos_token_id, auto.unk_token_id, len(auto)) == (2, 1, 0, 316)
    texts = _texts()
    bad = [t for t in texts if auto(t, add_special_tokens=False)["input_ids"] != tok.tokenize(t)]
    assert not bad, bad[:3]
    assert auto.decode(tok.tokenize(texts[0])) == texts[0]


def test_training_and_export(tmp_path: Path) -> None:
    """pretrain_moe.py (1 process) on the reference data with Megatron-LM's flags, then
    tools/export_hf.py: the exported tokenizer encodes the training data's text to its ids."""
    import subprocess

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_wsm.checkpoint.manager import resolve_load_dir
    from megatron_wsm.checkpoint.manifest import read_manifest
    from megatron_wsm.testing.config import TINY_MODEL
    from megatron_wsm.testing.launch import ROOT, run_pretrain

    data = tmp_path / "d_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(REF / "megatron_lm" / f"tiktoken_text_document{ext}", f"{data}{ext}")
    flags = [*FLAGS[:3], VOCAB, *FLAGS[4:]]
    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", 3, "--data-path", data, "--split", "80,20,0",
         *flags, "--save", tmp_path / "ckpt", "--save-interval", 3],
        tmp_path / "result.json",
    )  # fmt: skip
    assert len(result["train_history"]) == 3
    assert all(np.isfinite(h["loss"]) for h in result["train_history"])
    manifest = read_manifest(resolve_load_dir(tmp_path / "ckpt"))
    assert manifest is not None
    assert manifest.model_config["padded_vocab_size"] == 384  # 316 padded to 128
    export = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_hf.py"), "--load", str(tmp_path / "ckpt"),
         "--save", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    first = json.loads((REF / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    ds = IndexedDataset(str(data))  # kept: its items are views of its memory map
    ids = ds[0].tolist()
    assert auto(first, add_special_tokens=False)["input_ids"] == ids[:-1] and ids[-1] == 2
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 316
