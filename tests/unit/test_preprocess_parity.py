"""tools/preprocess_data.py writes the same .bin/.idx bytes as Megatron-LM's own
tools/preprocess_data.py (core_v0.16.1) for the same input and tokenizer.

The reference outputs, inputs and tokenizer files are in tests/data/megatron_lm/preprocess/
(made by its make_reference.py; command and commit in its README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_wsm.cli.preprocess_data import main

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "tests" / "data" / "megatron_lm" / "preprocess"

#: name → (our flags, input): the tokenizer flags Megatron-LM was run with, unchanged (for
#: GPT2BPETokenizer Megatron-LM needs --legacy-tokenizer: its megatron-core path downloads gpt2).
RUNS: dict[str, tuple[list[str], str]] = {
    "hf": (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "hf"], "corpus"),
    "gpt2": (
        ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "gpt2/vocab.json",
         "--merge-file", "gpt2/merges.txt", "--legacy-tokenizer"],
        "corpus",
    ),
    "sp": (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "spm.model"],
           "corpus"),
    "gptsp": (["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
               "spm.model"], "corpus"),
    "llama2": (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "spm.model"],
               "corpus"),
    "null": (["--tokenizer-type", "NullTokenizer", "--vocab-size", "511"], "null"),
}  # fmt: skip


def _run(tmp_path: Path, name: str, flags: list[str], source: str, *extra: str) -> Path:
    out = tmp_path / name
    # Megatron-LM's command line of the reference (README), unchanged but for the paths
    argv = ["--input", f"{source}.jsonl", "--output-prefix", str(out), "--workers", "1",
            "--append-eod"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(REF)  # the tokenizer paths are relative, as in the reference commands
    try:
        assert main([*argv, *flags, "--quiet", *extra]) == 0
    finally:
        os.chdir(cwd)
    return tmp_path / f"{name}_text_document"


def _same_bytes(ours: Path, name: str) -> None:
    for ext in (".bin", ".idx"):
        want = (REF / "megatron_lm" / f"{name}_text_document{ext}").read_bytes()
        got = Path(f"{ours}{ext}").read_bytes()
        assert got == want, f"{name}{ext}: {len(got)} bytes vs Megatron-LM's {len(want)}"


@pytest.mark.parametrize("name", list(RUNS))
def test_same_bytes_as_megatron_lm(tmp_path: Path, name: str) -> None:
    flags, source = RUNS[name]
    _same_bytes(_run(tmp_path, name, flags, source), name)


def test_default_sentencepiece_wrapper_gives_the_same_ids(tmp_path: Path) -> None:
    # no --tokenizer-type: megatron-wsm's own wrapper of the .model, same bytes
    _same_bytes(_run(tmp_path, "ours", ["--tokenizer-model", "spm.model"], "corpus"), "sp")


def test_workers_do_not_change_the_output(tmp_path: Path) -> None:
    flags, source = RUNS["gpt2"]
    _same_bytes(_run(tmp_path, "gpt2", flags, source, "--workers", "2"), "gpt2")


def test_the_reference_holds_what_makes_parity_non_trivial() -> None:
    """Empty documents (zero sequences), a list of sentences (several sequences, empty
    sentence dropped, EOD on the last), uint16 ids."""
    ds = IndexedDataset(str(REF / "megatron_lm" / "hf_text_document"))
    docs = ds.document_indices
    per_doc = np.diff(docs)
    assert per_doc[3] == 0, "the empty text is a document without sequences"
    assert per_doc[6] == 2, "the 3-sentence list with one empty sentence: 2 sequences"
    assert ds.index.dtype == np.uint16
    eod = 0  # <|endoftext|>, the BPE's first special token
    last = ds[int(docs[7]) - 1]
    assert last[-1] == eod and (ds[int(docs[6])][-1] != eod)


def test_every_json_key_gets_its_dataset(tmp_path: Path) -> None:
    # Megatron-LM 0.16 finalizes only the last key's .idx; here each key is complete and equal
    # to a run with that key alone.
    flags, source = RUNS["hf"]
    _run(tmp_path, "both", flags, source, "--json-keys", "title", "text")
    _run(tmp_path, "title", flags, source, "--json-keys", "title")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"both_title_document{ext}").read_bytes() == (
            tmp_path / f"title_title_document{ext}"
        ).read_bytes()
    _same_bytes(tmp_path / "both_text_document", "hf")


def test_huggingface_directory_offline_in_a_fresh_process(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    flags, source = RUNS["hf"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
         f"{source}.jsonl", "--output-prefix", str(tmp_path / "hf"), "--append-eod", "--quiet",
         *flags],
        cwd=REF, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _same_bytes(tmp_path / "hf_text_document", "hf")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split-sentences"], "NLTK"),
        (["--tokenizer-type", "BertWordPieceCase"], "BERT/T5"),
        (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "spm.model"],
         "not a directory"),
        (["--workers", "0"], "--workers"),
        (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "spm.model",
          "--legacy-tokenizer"], "GPT2BPETokenizer only"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "hf",
          "--trust-remote-code"], "never run"),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--partitions", "2"],
         "--partitions must be 1"),
    ],
)  # fmt: skip
def test_refusals_name_the_reason(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    cwd = os.getcwd()
    os.chdir(REF)
    try:
        rc = main(["--input", "corpus.jsonl", "--output-prefix", str(tmp_path / "x"), *extra])
    finally:
        os.chdir(cwd)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_bad_record_leaves_nothing(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2"}\n{"text": 3}\n')
    rc = main(["--input", str(bad), "--output-prefix", str(tmp_path / "o" / "x"), "--quiet",
               "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])  # fmt: skip
    assert rc == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not list((tmp_path / "o").iterdir())
