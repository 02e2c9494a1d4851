"""Data pipeline: embedded corpus, split by document, tokenizer, indexed datasets, GPT datasets."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_wsm.data.corpus import (
    Document,
    embedded_corpus,
    embedded_documents,
    read_jsonl,
    split_documents,
    split_of,
    write_jsonl,
)
from megatron_wsm.data.datasets import build_gpt_datasets
from megatron_wsm.data.indexed import write_indexed_dataset
from megatron_wsm.data.prepare import prepare_embedded_data
from megatron_wsm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from megatron_wsm.ports import free_port

REPO = Path(__file__).resolve().parents[2]

ASCII_SAMPLES = [
    "Hello, world!",
    "def f(x):\n    return  x + 1\n\n\n",
    "  leading spaces and trailing  ",
    "\ttabs\tand\r\nCRLF\n",
    "class A:\n    '''Doc.'''\n\n    def m(self) -> int:\n        return 42  # answer\n",
    "numbers 1234567890 and symbols ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    "",
]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    """A 512-piece tokenizer trained on a slice of the corpus (fast)."""
    docs = embedded_documents()[:40]
    model = train_sentencepiece(
        (d.text for d in docs), tmp_path_factory.mktemp("tok") / "small", vocab_size=512
    )
    return SentencePieceTokenizer(model)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    t0 = time.perf_counter()
    data = prepare_embedded_data(out, vocab_size=1024, seed=7)
    return data, out, time.perf_counter() - t0


# -- corpus -----------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_sized() -> None:
    docs = embedded_documents()
    assert docs == embedded_documents()
    names = [d.name for d in docs]
    assert len(names) == len(set(names)), "document names must be unique"
    assert names[0].startswith("topic:") and names[-1].startswith("module:")
    topics = [n for n in names if n.startswith("topic:")]
    assert topics == sorted(topics)
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    # ~1.5 MB on CPython 3.11; the exact figure moves a little between Python versions.
    assert 1_000_000 < total < 3_000_000, total
    assert len(docs) > 200
    assert all(d.text for d in docs)
    corpus = embedded_corpus()
    assert len(corpus.skipped_modules) < 10  # a few may be missing on minimal builds


def test_corpus_text_ignores_caller_state() -> None:
    # The extraction runs in an isolated interpreter: it sees no patch of this process (torch,
    # imported by this test module, replaces inspect.getfile).
    text = {d.name: d.text for d in embedded_documents()}["module:inspect"]
    assert "inspect.getfile\n\nWork out which source or compiled file" in text


def test_split_by_document_is_deterministic_disjoint_and_covering() -> None:
    docs = embedded_documents()
    a = split_documents(docs, 0.05, 0.05)
    b = split_documents(list(reversed(docs)), 0.05, 0.05)
    assert set(a) == {"train", "valid", "test"}
    names = {k: [d.name for d in v] for k, v in a.items()}
    for k in a:
        assert set(names[k]) == {d.name for d in b[k]}, "split must not depend on order"
        assert names[k], f"{k} split is empty"
    all_names = [n for v in names.values() for n in v]
    assert sorted(all_names) == sorted(d.name for d in docs)
    assert len(all_names) == len(set(all_names))
    # About 90/5/5 of the documents.
    assert 0.8 < len(names["train"]) / len(docs) < 0.97
    # Removing documents never moves the others.
    sub = split_documents(docs[::2], 0.05, 0.05)
    for k, v in sub.items():
        assert {d.name for d in v} <= set(names[k])
    assert split_of(names["valid"][0]) == "valid"


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        split_documents([Document("a", "x")], 0.6, 0.5)
    with pytest.raises(ValueError):
        split_documents([Document("a", "x"), Document("a", "y")])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    docs = [Document("a", "first\nline"), Document("b", "ünïcödé 😀")]
    assert write_jsonl(docs, tmp_path / "d.jsonl") == 2
    assert read_jsonl(tmp_path / "d.jsonl") == docs


# -- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_special_ids(small_tokenizer: SentencePieceTokenizer) -> None:
    tok = small_tokenizer
    for text in ASCII_SAMPLES:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.detokenize(ids) == text
        assert tok.detokenize(np.asarray(ids, dtype=np.uint16)) == text
    # Byte fallback: anything round-trips, never <unk>.
    exotic = "naïve café — 東京 😀"
    assert tok.detokenize(tok.tokenize(exotic)) == exotic
    assert tok.unk not in tok.tokenize(exotic)
    assert tok.vocab_size == 512
    assert (tok.unk, tok.bos, tok.eos, tok.pad) == (0, 1, 2, 3)
    assert tok.eod == tok.eos
    assert tok.vocab["\n"] == 4 and tok.inv_vocab[4] == "\n"
    assert tok.unique_identifiers["class"] == "SentencePieceTokenizer"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(ASCII_SAMPLES[1]) == tok.tokenize(ASCII_SAMPLES[1])
    assert clone.unique_identifiers == tok.unique_identifiers


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    texts = [d.text for d in embedded_documents()[:15]]
    a = train_sentencepiece(texts, tmp_path / "a", vocab_size=400, seed=3)
    b = train_sentencepiece(iter(texts), tmp_path / "b", vocab_size=400, seed=3)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(str(tmp_path / "a") + ".vocab").is_file()


# -- indexed datasets -------------------------------------------------------------------------
def test_indexed_dataset_round_trip(tmp_path: Path, small_tokenizer) -> None:
    texts = ["alpha beta\n", "", "gamma\n    delta", "x" * 1000]
    stats = write_indexed_dataset(texts, small_tokenizer, tmp_path / "ds", append_eod=True)
    assert (stats.documents, stats.empty_documents) == (3, 1)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == 3 and ds.index.dtype == np.uint16
    expected = [small_tokenizer.tokenize(t) + [small_tokenizer.eod] for t in texts if t]
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert int(ds.sequence_lengths.sum()) == stats.tokens
    assert not list(tmp_path.glob("*.tmp-*")), "temporary files left behind"


# -- prepare ----------------------------------------------------------------------------------
def test_prepare_is_cached_and_complete(prepared) -> None:
    data, out, first_seconds = prepared
    assert first_seconds < 60
    root = Path(data.root)
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.iterdir() if p.is_file()}
    t0 = time.perf_counter()
    again = prepare_embedded_data(out, vocab_size=1024, seed=7)
    assert time.perf_counter() - t0 < 1.0
    assert again == data
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in root.iterdir() if p.is_file()}
    for split in ("train", "valid", "test"):
        prefix = data.prefix(split)
        assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
        s = data.stats["splits"][split]
        assert s["documents"] == len(IndexedDataset(prefix)) > 0
        assert s["tokens"] > s["documents"]
        names = {d.name for d in read_jsonl(root / "corpus" / f"{split}.jsonl")}
        assert all(split_of(n) == split for n in names)
    assert data.stats["splits"]["train"]["tokens"] > 10 * data.stats["splits"]["valid"]["tokens"]
    assert SentencePieceTokenizer(data.tokenizer_model).vocab_size == 1024
    assert not list(out.glob(".tmp-*"))


def test_prepare_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    results: list = []
    errors: list = []

    def call() -> None:
        try:
            results.append(prepare_embedded_data(tmp_path, vocab_size=600, seed=1))
        except Exception as err:  # noqa: BLE001 - any failure is reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("embedded-")] == [
        Path(results[0].root).name
    ]
    assert not list(tmp_path.glob(".tmp-*"))


# -- GPT datasets -----------------------------------------------------------------------------
def test_gpt_datasets_from_prepared(prepared, tmp_path: Path) -> None:
    data, _, _ = prepared
    tok = SentencePieceTokenizer(data.tokenizer_model)
    seq = 64
    train, valid, test = build_gpt_datasets(
        data.train_prefix,
        data.valid_prefix,
        data.test_prefix,
        tok,
        seq,
        1234,
        (500, None, None),
        path_to_cache=str(tmp_path / "cache"),
    )
    assert len(train) >= 500
    valid_tokens = data.stats["splits"]["valid"]["tokens"]
    assert len(valid) == (valid_tokens - 1) // seq  # one epoch, last partial sample dropped
    for ds in (train, valid, test):
        s = ds[0]
        assert s["tokens"].shape == (seq,) and s["labels"].shape == (seq,)
        assert s["tokens"].dtype == torch.int64
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(seq))
        assert s["loss_mask"].shape == (seq,) and float(s["loss_mask"].min()) == 1.0
        assert s["attention_mask"].shape == (1, seq, seq)
    # Cached indices: a rebuild reads them and yields the same samples.
    assert len(list((tmp_path / "cache").glob("*-GPTDataset-train-shuffle_index.npy"))) == 1
    train2, _, _ = build_gpt_datasets(
        data.train_prefix,
        None,
        None,
        data.tokenizer_model,
        seq,
        1234,
        (500, None, None),
        path_to_cache=str(tmp_path / "cache"),
    )
    assert torch.equal(train2[17]["tokens"], train[17]["tokens"])


def test_gpt_datasets_from_single_prefix_split(prepared, tmp_path: Path) -> None:
    data, _, _ = prepared
    n_docs = data.stats["splits"]["train"]["documents"]
    train, valid, test = build_gpt_datasets(
        data.train_prefix,
        None,
        None,
        data.tokenizer_model,
        32,
        1,
        (50, 5, None),
        str(tmp_path),
        split="90,10,0",
    )
    assert test is None and len(train) >= 50 and len(valid) >= 5
    # A split whose range holds no document would make megatron-core loop forever: it becomes
    # None with a warning instead (fewer than 1000 documents, so 1/1000 rounds to none).
    assert n_docs < 1000
    with pytest.warns(RuntimeWarning, match="no test document"):
        train, valid, test = build_gpt_datasets(
            data.train_prefix,
            None,
            None,
            data.tokenizer_model,
            32,
            1,
            (50, 5, 5),
            str(tmp_path),
            split="949,50,1",
        )
    assert test is None and valid is not None


# -- CLIs -------------------------------------------------------------------------------------
def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("tool", ["train_tokenizer", "preprocess_data"])
def test_cli_help(tool: str) -> None:
    proc = _run(str(REPO / "tools" / f"{tool}.py"), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--output-prefix" in proc.stdout


def test_cli_train_tokenizer_and_preprocess(tmp_path: Path) -> None:
    docs = embedded_documents()[:30]
    write_jsonl(docs, tmp_path / "in.jsonl")
    proc = _run(
        str(REPO / "tools" / "train_tokenizer.py"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--vocab-size",
        "400",
        "--output-prefix",
        str(tmp_path / "tok"),
    )
    assert proc.returncode == 0, proc.stderr
    model = tmp_path / "tok.model"
    assert model.is_file()
    proc = _run(
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--json-keys",
        "text",
        "--tokenizer-model",
        str(model),
        "--output-prefix",
        str(tmp_path / "out" / "corpus"),
        "--append-eod",
        "--workers",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    prefix = str(tmp_path / "out" / "corpus_text_document")
    ds = IndexedDataset(prefix)
    tok = SentencePieceTokenizer(model)
    assert len(ds) == len(docs)
    for i in (0, 7, len(docs) - 1):
        assert ds[i].tolist() == tok.tokenize(docs[i].text) + [tok.eod]


def test_cli_preprocess_reports_errors(tmp_path: Path, small_tokenizer, capsys) -> None:
    from megatron_wsm.cli.preprocess_data import main

    write_jsonl([Document("a", "some text")], tmp_path / "in.jsonl")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-model", small_tokenizer.path]
    argv += ["--output-prefix", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--json-keys", "missing"]) == 1
    assert "no key 'missing'" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*")), "nothing is left behind on error"
    assert main([*argv, "--workers", "0"]) == 2
    assert main(argv) == 0
    # Keep the dataset alive while reading: items are views of its mmap, closed in __del__.
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds[0].tolist() == small_tokenizer.tokenize("some text")


# -- torch.distributed ------------------------------------------------------------------------
_DIST_WORKER = r"""
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from megatron_wsm.data.datasets import build_gpt_datasets
p = json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
# Each rank runs in its own directory with a *relative* cache path: caches that are not shared,
# like node-local disks on two nodes.
node = os.path.join(sys.argv[3], f"node{rank}")
os.makedirs(node, exist_ok=True)
os.chdir(node)
train, valid, test = build_gpt_datasets(
    p["train"], p["valid"], p["test"], p["tok"], 32, 7, (200, None, None), path_to_cache="cache"
)
digest = hashlib.sha256(b"".join(train[i]["tokens"].numpy().tobytes() for i in range(50)))
out = [None] * dist.get_world_size()
dist.all_gather_object(out, (digest.hexdigest(), len(train), len(valid), len(test)))
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_gpt_datasets_under_torch_distributed_with_node_local_caches(prepared, tmp_path) -> None:
    data, _, _ = prepared
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    paths = json.dumps(
        {
            "train": data.train_prefix,
            "valid": data.valid_prefix,
            "test": data.test_prefix,
            "tok": data.tokenizer_model,
        }
    )
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONWARNINGS="ignore",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(REPO), paths, str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    line = next(ln for ln in outputs[0][0].splitlines() if ln.startswith("RESULT "))
    per_rank = json.loads(line[len("RESULT ") :])
    assert per_rank[0] == per_rank[1], "ranks must see identical samples"
    for rank in range(2):  # both "nodes" now hold the full index cache
        files = sorted(p.name for p in (tmp_path / f"node{rank}" / "cache").glob("*.npy"))
        assert len(files) == 9
