"""The ``env-python`` corpus: file selection rules, dedup, split stability, the cached build
(deterministic token ids on a small slice of this interpreter's files) and the trainer wiring."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from megatron_wsm.config import ConfigError, DataConfig, RunConfig
from megatron_wsm.data.corpus import Document, split_documents
from megatron_wsm.data.env_python import (
    SelectionStats,
    SourceRoot,
    clean_source,
    environment_fingerprint,
    list_source_files,
    select_documents,
    source_roots,
    strip_leading_comments,
)
from megatron_wsm.data.prepare import prepare_env_python_data
from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.testing.launch import run_pretrain, run_script


def _documents(roots: tuple[SourceRoot, ...]) -> tuple[list[Document], SelectionStats]:
    """Every document of ``roots`` that the env-python selection keeps, with its statistics."""
    files, _ = list_source_files(roots)
    return select_documents(files)


#: A slice of this interpreter's stdlib with at least one valid and one test file (19 files on
#: CPython 3.11; the selection is a prefix of the sorted stdlib, so it grows only by ~files).
SLICE_BYTES = 500_000

LICENSE = "# Copyright 2024 Somebody\n# Licensed under the Apache License 2.0\n\n"


def _tree(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return tmp_path


def _roots(tmp_path: Path) -> tuple[SourceRoot, ...]:
    return (
        SourceRoot("stdlib", str(tmp_path / "lib")),
        SourceRoot("purelib", str(tmp_path / "site")),
    )


# -- selection rules --------------------------------------------------------------------------
def test_leading_comment_block_is_stripped_and_later_comments_kept() -> None:
    src = (
        "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"
        + LICENSE
        + "import os  # why\n# later\nx = 1\n"
    )
    assert strip_leading_comments(src) == "import os  # why\n# later\nx = 1\n"
    # license text inside the module docstring is kept (rule: comments only)
    assert strip_leading_comments('"""Licensed under MIT."""\n') == '"""Licensed under MIT."""\n'
    assert strip_leading_comments("# only a header\n\n   \n") == ""
    assert clean_source(b"\xef\xbb\xbfx = 1\r\ny = 2\r") == "x = 1\ny = 2\n"
    assert clean_source(b"x = '\xe9'\n") is None  # latin-1, not UTF-8


def test_selection_skips_tests_caches_big_files_and_the_stdlib_site_packages(tmp_path) -> None:
    _tree(
        tmp_path,
        {
            "lib/b.py": "b = 1\n",
            "lib/a.py": "a = 1\n",
            "lib/pkg/__init__.py": LICENSE,  # empty after the header
            "lib/pkg/mod.py": LICENSE + "def f():\n    return 1\n",
            "lib/pkg/tests/test_mod.py": "assert True\n",
            "lib/test/test_a.py": "assert True\n",
            "lib/__pycache__/a.py": "cached = 1\n",
            "lib/.hidden/h.py": "h = 1\n",
            "lib/site-packages/other.py": "other = 1\n",
            "lib/notes.txt": "not python\n",
            "lib/latin.py": b"x = '\xe9'\n",
            "lib/big.py": "x = 1\n" * 100,
            # only the stdlib root skips its top-level site-packages
            "site/pkg/site-packages/deep.py": "deep = 1\n",
            "site/z.py": "z = 1\n",
            "site/vendored/a.py": "a = 1\n",  # same text as lib/a.py
        },
    )
    roots = _roots(tmp_path)
    files, too_large = list_source_files(roots, max_file_bytes=200)
    assert too_large == 1
    names = [f.name for f in files]
    # root by root (stdlib first), sorted within a root
    assert names == [
        "stdlib/a.py",
        "stdlib/b.py",
        "stdlib/latin.py",
        "stdlib/pkg/__init__.py",
        "stdlib/pkg/mod.py",
        "purelib/pkg/site-packages/deep.py",
        "purelib/vendored/a.py",
        "purelib/z.py",
    ]
    docs, stats = select_documents(files)
    assert [d.name for d in docs] == [
        "stdlib/a.py",
        "stdlib/b.py",
        "stdlib/pkg/mod.py",
        "purelib/pkg/site-packages/deep.py",
        "purelib/z.py",
    ]
    assert docs[2].text == "def f():\n    return 1\n"
    assert (stats.undecodable, stats.empty, stats.duplicates, stats.documents) == (1, 1, 1, 5)
    assert stats.bytes == sum(len(d.text.encode()) for d in docs)
    assert not stats.truncated


def test_dedup_keeps_the_first_copy_even_when_headers_differ(tmp_path) -> None:
    body = "def g(x):\n    return x * 2\n"
    _tree(
        tmp_path,
        {
            "lib/one.py": "# Copyright 2020\n" + body,
            "site/two.py": "# Copyright 2023 Someone Else\n\n" + body,
            "site/three.py": body + "\n# trailing comment makes it different\n",
        },
    )
    docs, stats = _documents(_roots(tmp_path))
    assert [d.name for d in docs] == ["stdlib/one.py", "purelib/three.py"]
    assert stats.duplicates == 1


def test_max_bytes_takes_a_prefix_and_stops_reading(tmp_path) -> None:
    _tree(tmp_path, {f"lib/m{i:02d}.py": f"value_{i} = {i}\n" for i in range(20)})
    roots = _roots(tmp_path)
    everything, _ = _documents(roots)
    read: list[int] = []
    files, _ = list_source_files(roots)
    part, stats = select_documents(files, max_bytes=40, on_file=read.append)
    assert stats.truncated and stats.bytes >= 40
    assert part == everything[: len(part)] and 0 < len(part) < len(everything)
    # the file that crosses the limit is kept, nothing after it is read
    assert stats.bytes - len(part[-1].text.encode()) < 40
    assert len(read) == len(part)


def test_split_by_file_is_stable_when_files_come_and_go(tmp_path) -> None:
    _tree(tmp_path, {f"lib/m{i:03d}.py": f"v = {i}\n" for i in range(300)})
    roots = _roots(tmp_path)
    docs, _ = _documents(roots)

    def assignment(ds) -> dict[str, str]:
        return {d.name: s for s, group in split_documents(ds).items() for d in group}

    before = assignment(docs)
    assert set(before.values()) == {"train", "valid", "test"}
    # add files (sorting puts some in front of existing ones) and remove others
    _tree(tmp_path, {f"lib/a{i:03d}.py": f"w = {i}\n" for i in range(50)})
    for i in range(0, 300, 7):
        (tmp_path / f"lib/m{i:03d}.py").unlink()
    after = assignment(_documents(roots)[0])
    common = set(before) & set(after)
    assert len(common) == 300 - len(range(0, 300, 7))
    assert all(before[n] == after[n] for n in common)


def test_roots_follow_sysconfig_and_drop_nested_or_equal_roots(tmp_path) -> None:
    (tmp_path / "lib" / "site-packages").mkdir(parents=True)
    paths = {
        "stdlib": str(tmp_path / "lib"),
        "purelib": str(tmp_path / "lib" / "site-packages"),
        "platlib": str(tmp_path / "lib" / "site-packages"),
    }
    assert [r.label for r in source_roots(paths)] == ["stdlib"]
    here = source_roots()
    assert here[0] == SourceRoot("stdlib", str(Path(sysconfig.get_paths()["stdlib"]).resolve()))
    fp = environment_fingerprint(here)
    assert fp["num_distributions"] > 0 and fp == environment_fingerprint(here)


# -- the cached build on this interpreter's files ---------------------------------------------
@pytest.fixture(scope="module")
def slice_builds(tmp_path_factory: pytest.TempPathFactory):
    a = prepare_env_python_data(tmp_path_factory.mktemp("a"), vocab_size=512, max_bytes=SLICE_BYTES)
    b = prepare_env_python_data(tmp_path_factory.mktemp("b"), vocab_size=512, max_bytes=SLICE_BYTES)
    return a, b


def test_slice_build_is_deterministic_and_cached(slice_builds) -> None:
    a, b = slice_builds
    assert Path(a.root).name.startswith("env-python-py") and Path(a.root).name == Path(b.root).name
    for name in ("tokenizer.model", "files.tsv", "stamp.json"):
        assert (Path(a.root) / name).read_bytes() == (Path(b.root) / name).read_bytes(), name
    for split in ("train", "valid", "test"):
        for ext in (".bin", ".idx"):
            assert (
                Path(a.prefix(split) + ext).read_bytes() == Path(b.prefix(split) + ext).read_bytes()
            )
        assert a.stats["splits"][split]["tokens"] > a.stats["splits"][split]["documents"] > 0
    sel = a.stats["selection"]
    assert sel["truncated"] and SLICE_BYTES <= sel["bytes"] < SLICE_BYTES + 256 * 1024
    rows = (Path(a.root) / "files.tsv").read_text().splitlines()[1:]
    assert len(rows) == sel["documents"] and all(r.startswith("stdlib/") for r in rows)
    # a second call is a cache hit: same result, nothing rebuilt
    again = prepare_env_python_data(Path(a.root).parent, vocab_size=512, max_bytes=SLICE_BYTES)
    assert again == a
    # another slice size is another cache entry, next to the first
    assert json.loads((Path(a.root) / "stamp.json").read_text())["max_bytes"] == SLICE_BYTES


def test_bad_slice_sizes_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        prepare_env_python_data(tmp_path, vocab_size=512, max_bytes=0)
    # so few files that a held-out split is empty: one clear error, no half-built cache
    with pytest.raises(RuntimeError, match="split 'valid' is empty"):
        prepare_env_python_data(tmp_path, vocab_size=512, max_bytes=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", "env-python-"))]


# -- configuration and trainer wiring ---------------------------------------------------------
def test_data_source_round_trips_and_old_manifests_default_to_embedded() -> None:
    cfg = RunConfig(data=DataConfig(data_source="env-python", data_max_bytes=123, vocab_size=512))
    back = RunConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert back.data == cfg.data
    old = cfg.to_json()
    del old["data"]["data_source"], old["data"]["data_max_bytes"]
    assert RunConfig.from_json(old).data.data_source == "embedded"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DataConfig(data_source="web"), "--data-source 'web'"),
        (DataConfig(data_max_bytes=10), "env-python only"),
        (DataConfig(data_source="env-python", data_max_bytes=0), "must be positive"),
        (DataConfig(data_source="env-python", data_path="x"), "--data-path replaces it"),
    ],
)
def test_data_source_validation(data: DataConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        data.validate()


@pytest.mark.distributed
def test_trainer_runs_on_an_env_python_slice(tmp_path) -> None:
    cache = tmp_path / "cache"
    result = run_pretrain(
        [
            *TINY_MODEL,  # --vocab-size 512
            "--data-source",
            "env-python",
            "--data-max-bytes",
            str(SLICE_BYTES),
            "--data-cache-dir",
            str(cache),
            "--train-iters",
            "2",
        ],
        tmp_path / "out.json",
    )
    assert len(result["train_history"]) == 2
    built = [p.name for p in cache.iterdir() if p.name.startswith(("env-python-", "embedded-"))]
    assert len(built) == 1 and built[0].startswith("env-python-py")
    stamp = json.loads((cache / built[0] / "stamp.json").read_text())
    assert (stamp["max_bytes"], stamp["vocab_size"]) == (SLICE_BYTES, 512)


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_tool_rebuilds_the_env_python_data_from_the_manifest(tmp_path) -> None:
    cache, ckpt = tmp_path / "cache", tmp_path / "ckpt"
    trained = run_pretrain(
        [
            *TINY_MODEL,
            "--data-source",
            "env-python",
            "--data-max-bytes",
            str(SLICE_BYTES),
            "--data-cache-dir",
            str(cache),
            "--train-iters",
            "2",
            "--save",
            str(ckpt),
        ],
        tmp_path / "train.json",
    )
    out = tmp_path / "eval.json"
    # the trainer's evaluation set (evaluate.py defaults to the whole split, other batch sizes)
    same_eval = ["--eval-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2"]
    run_script("tools/evaluate.py", ["--load", ckpt, *same_eval, "--output-json", out])
    evaluated = json.loads(out.read_text())
    # the same held-out samples of the same slice: the trainer's final validation, exactly
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    # no embedded corpus was built on the way: the manifest's data_source was used
    built = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(built) == 2 and built[0].startswith("env-python-py") and built[1] == "index_cache"
