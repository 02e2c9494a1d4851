"""One call from nothing to trainable data: the embedded corpus, a tokenizer, three datasets.

:func:`prepare_embedded_data` splits the embedded corpus by document (train/valid/test), trains
a SentencePiece BPE tokenizer on the *train* documents only, and writes one megatron-core indexed
dataset per split. Outputs live in ``<out_dir>/embedded-<settings key>/``::

    stamp.json                       settings + Python/sentencepiece versions (cache key)
    stats.json                       bytes, documents and tokens per split
    tokenizer.model / tokenizer.vocab
    corpus/{train,valid,test}.jsonl  the split documents as text (for inspection, or the CLIs)
    train.bin/.idx  valid.bin/.idx  test.bin/.idx

The directory is built under a temporary name and renamed into place, so it is either complete
or absent; a second call with the same settings only reads ``stamp.json``. Concurrent callers
(every torchrun rank) serialise on an exclusive ``fcntl.flock`` of ``<out_dir>/.lock``: the first
builds, the others then find the cache. Different settings get different directories and coexist.

:func:`prepare_env_python_data` does the same for the ``env-python`` corpus
(:mod:`megatron_wsm.data.env_python`) in ``<out_dir>/env-python-<settings key>/``, with
``files.tsv`` (selected names, split, bytes) instead of ``corpus/*.jsonl``, its own lock
(``<out_dir>/.lock-env-python``) and optional progress bars for its one-time build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_wsm.data.corpus import (
    CORPUS_VERSION,
    SPLITS,
    embedded_corpus,
    split_documents,
    write_jsonl,
)
from megatron_wsm.data.env_python import (
    ENV_PYTHON_VERSION,
    MAX_FILE_BYTES,
    SourceRoot,
    environment_fingerprint,
    list_source_files,
    select_documents,
    source_roots,
)

#: Bump when the layout or the preparation recipe changes (invalidates every cache).
PREPARE_FORMAT = 1
STAMP_NAME = "stamp.json"

#: Default vocabulary of the ``env-python`` corpus (≈ 150x the embedded corpus's text).
ENV_PYTHON_VOCAB_SIZE = 16384


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared embedded dataset (prefixes are without ``.bin``/``.idx``)."""

    train_prefix: str
    valid_prefix: str
    test_prefix: str
    tokenizer_model: str
    root: str  #: the directory holding all of the above
    stats: dict[str, Any]  #: contents of ``stats.json`` (bytes/documents/tokens per split)

    def prefix(self, split: str) -> str:
        """The indexed-dataset prefix of ``split`` (``train``, ``valid`` or ``test``)."""
        return {"train": self.train_prefix, "valid": self.valid_prefix, "test": self.test_prefix}[
            split
        ]


def _settings(vocab_size: int, seed: int, valid_fraction: float, test_fraction: float) -> dict:
    import sentencepiece

    return {
        "prepare_format": PREPARE_FORMAT,
        "corpus_version": CORPUS_VERSION,
        "vocab_size": vocab_size,
        "seed": seed,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        # The corpus is made of this interpreter's docstrings: another Python, another corpus.
        "python": sys.version,
        "python_implementation": sys.implementation.name,
        "sentencepiece": sentencepiece.__version__,
    }


def _settings_key(settings: dict, source: str = "embedded") -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()
    major, minor = sys.version_info[:2]
    return f"{source}-py{major}{minor}-v{settings['vocab_size']}-{digest[:12]}"


def _result(root: Path, stats: dict[str, Any]) -> PreparedData:
    return PreparedData(
        train_prefix=str(root / "train"),
        valid_prefix=str(root / "valid"),
        test_prefix=str(root / "test"),
        tokenizer_model=str(root / "tokenizer.model"),
        root=str(root),
        stats=stats,
    )


def _load_if_complete(root: Path, settings: dict) -> PreparedData | None:
    """The cached result in ``root`` if its stamp matches ``settings`` and all files exist."""
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
        stats = json.loads((root / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp != settings:
        return None
    result = _result(root, stats)
    needed = [result.tokenizer_model]
    for split in SPLITS:
        needed += [result.prefix(split) + ".bin", result.prefix(split) + ".idx"]
    if not all(os.path.isfile(p) for p in needed):
        return None
    return result


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the block.

    The lock is released by the kernel if the holder dies, so a killed run never blocks others.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build(tmp: Path, settings: dict, vocab_size: int, seed: int) -> dict[str, Any]:
    """Write every output into ``tmp``; returns the stats."""
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    t0 = time.perf_counter()
    corpus = embedded_corpus()
    splits = split_documents(
        corpus.documents, settings["valid_fraction"], settings["test_fraction"]
    )
    for split in SPLITS:
        if not splits[split]:
            raise RuntimeError(f"the embedded corpus split {split!r} is empty; change fractions")
        write_jsonl(splits[split], tmp / "corpus" / f"{split}.jsonl")
    t_corpus = time.perf_counter()

    model_path = train_sentencepiece(
        (d.text for d in splits["train"]), tmp / "tokenizer", vocab_size=vocab_size, seed=seed
    )
    tokenizer = SentencePieceTokenizer(model_path)
    t_tokenizer = time.perf_counter()

    stats: dict[str, Any] = {
        "python": sys.version.split()[0],
        "vocab_size": tokenizer.vocab_size,
        "skipped_modules": list(corpus.skipped_modules),
        "empty_modules": list(corpus.empty_modules),
        "splits": {},
    }
    return _tokenize_and_stamp(
        tmp, splits, tokenizer, stats, settings, (t0, t_corpus, t_tokenizer), None
    )


def _tokenize_and_stamp(
    tmp: Path,
    splits: dict[str, list[Any]],
    tokenizer: Any,
    stats: dict[str, Any],
    settings: dict,
    times: tuple[float, float, float],
    progress_label: str | None,
) -> dict[str, Any]:
    """The common end of a cache build: each split's indexed dataset (a byte progress bar
    labelled ``progress_label`` when given), ``stats.json`` with the stage timings
    (``times``: start, corpus done, tokenizer done), and the stamp. Returns the stats."""
    from megatron_wsm.data.indexed import write_indexed_dataset

    t0, t_corpus, t_tokenizer = times
    for split in SPLITS:
        split_bytes = sum(len(d.text.encode("utf-8")) for d in splits[split])
        desc = f"{progress_label}: tokenize {split}"
        with _bar(progress_label is not None, split_bytes, desc) as bar:
            written = write_indexed_dataset(
                (d.text for d in splits[split]),
                tokenizer,
                tmp / split,
                append_eod=True,
                on_document=bar.update,
            )
        stats["splits"][split] = {
            "documents": written.documents,
            "bytes": written.text_bytes,
            "tokens": written.tokens,
        }
    t_end = time.perf_counter()
    stats["seconds"] = {
        "corpus": round(t_corpus - t0, 3),
        "tokenizer": round(t_tokenizer - t_corpus, 3),
        "tokenize": round(t_end - t_tokenizer, 3),
    }
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    # The stamp is written last: a directory with a matching stamp is complete by construction.
    (tmp / STAMP_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return stats


def prepare_embedded_data(
    out_dir: str | os.PathLike[str],
    vocab_size: int = 4096,
    seed: int = 1234,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> PreparedData:
    """Build (or reuse) the embedded corpus's tokenizer and train/valid/test indexed datasets.

    Args:
        out_dir: cache directory (created); several settings can share it.
        vocab_size: SentencePiece vocabulary size.
        seed: SentencePiece training seed.
        valid_fraction: expected fraction of *documents* held out for validation.
        test_fraction: expected fraction of *documents* held out for test.

    Returns:
        The paths of the three dataset prefixes and of the tokenizer model, plus the stats.

    Safe to call from many processes at once (file lock); idempotent (a matching cache is reused
    without recomputing the corpus). The held-out split is by document name, so valid/test are
    the same on every run with the same Python version and fractions.
    """
    settings = _settings(vocab_size, seed, valid_fraction, test_fraction)
    return _cached_build(
        Path(out_dir),
        "embedded",
        ".lock",
        settings,
        lambda tmp: _build(tmp, settings, vocab_size, seed),
    )


def _cached_build(
    out: Path,
    source: str,
    lock_name: str,
    settings: dict,
    build: Callable[[Path], dict[str, Any]],
) -> PreparedData:
    """The cached ``<source>-...`` directory of ``settings`` under ``out``, built by ``build``
    (which fills a temporary directory and returns the stats) when missing or stale."""
    out.mkdir(parents=True, exist_ok=True)
    root = out / _settings_key(settings, source)
    with file_lock(out / lock_name):
        cached = _load_if_complete(root, settings)
        if cached is not None:
            return cached
        # Leftovers of killed runs: nobody else is building while we hold the lock.
        for stale in out.glob(f".tmp-{source}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{source}-", dir=out))
        try:
            stats = build(tmp)
            if root.exists():  # incomplete or foreign content under our name: replace it
                trash = Path(tempfile.mkdtemp(prefix=f".tmp-{source}-old-", dir=out))
                os.replace(root, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _result(root, stats)


def _env_python_settings(
    vocab_size: int,
    seed: int,
    valid_fraction: float,
    test_fraction: float,
    max_bytes: int | None,
    max_file_bytes: int,
    roots: tuple[SourceRoot, ...],
) -> dict:
    import sentencepiece

    return {
        "prepare_format": PREPARE_FORMAT,
        "env_python_version": ENV_PYTHON_VERSION,
        "vocab_size": vocab_size,
        "seed": seed,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "max_bytes": max_bytes,
        "max_file_bytes": max_file_bytes,
        # The corpus is this environment's files: another Python or package set, another corpus.
        "environment": environment_fingerprint(roots),
        "python_implementation": sys.implementation.name,
        "sentencepiece": sentencepiece.__version__,
    }


def _bar(progress: bool, total: int, desc: str) -> Any:
    """A tqdm byte counter (a disabled one when ``progress`` is off)."""
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
    )


def _build_env_python(
    tmp: Path,
    settings: dict,
    roots: tuple[SourceRoot, ...],
    progress: bool,
) -> dict[str, Any]:
    """Select, split, train the tokenizer and tokenize into ``tmp``; returns the stats."""
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    t0 = time.perf_counter()
    files, too_large = list_source_files(roots, settings["max_file_bytes"])
    total = sum(f.size for f in files)
    if settings["max_bytes"] is not None:
        total = min(total, settings["max_bytes"])
    with _bar(progress, total, "env-python: read") as bar:
        docs, selection = select_documents(files, settings["max_bytes"], bar.update)
    selection.too_large = too_large
    splits = split_documents(docs, settings["valid_fraction"], settings["test_fraction"])
    for split in SPLITS:
        if not splits[split]:
            raise RuntimeError(
                f"the env-python split {split!r} is empty ({len(docs)} files selected); "
                "raise max_bytes or change the fractions"
            )
    # Names, not texts: the texts are the environment's own files (a copy would double the
    # cache), and the list is what an audit of the selection and the split needs.
    with open(tmp / "files.tsv", "w", encoding="utf-8") as f:
        f.write("name\tsplit\tbytes\n")
        for split in SPLITS:
            for doc in splits[split]:
                f.write(f"{doc.name}\t{split}\t{len(doc.text.encode('utf-8'))}\n")
    t_corpus = time.perf_counter()

    if progress:
        print(
            f"env-python: training a {settings['vocab_size']}-piece tokenizer on "
            f"{len(splits['train'])} files (one-time, single thread)",
            file=sys.stderr,
            flush=True,
        )
    model_path = train_sentencepiece(
        (d.text for d in splits["train"]),
        tmp / "tokenizer",
        vocab_size=settings["vocab_size"],
        seed=settings["seed"],
    )
    tokenizer = SentencePieceTokenizer(model_path)
    t_tokenizer = time.perf_counter()

    stats: dict[str, Any] = {
        "python": sys.version.split()[0],
        "vocab_size": tokenizer.vocab_size,
        "roots": [[r.label, r.path] for r in roots],
        "selection": dataclasses.asdict(selection),
        "splits": {},
    }
    return _tokenize_and_stamp(
        tmp, splits, tokenizer, stats, settings, (t0, t_corpus, t_tokenizer),
        "env-python" if progress else None,
    )


def prepare_env_python_data(
    out_dir: str | os.PathLike[str],
    vocab_size: int = ENV_PYTHON_VOCAB_SIZE,
    seed: int = 1234,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_bytes: int | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    roots: tuple[SourceRoot, ...] | None = None,
    progress: bool = False,
) -> PreparedData:
    """Build (or reuse) the ``env-python`` corpus's tokenizer and indexed datasets.

    The same outputs as :func:`prepare_embedded_data` (``files.tsv``, the selected names with
    their split, replaces ``corpus/*.jsonl``) in ``<out_dir>/env-python-<settings key>/``,
    serialised on ``<out_dir>/.lock-env-python`` (so a long build does not hold up embedded-corpus
    runs sharing the directory).

    Args:
        out_dir: cache directory (created); shared with the embedded corpus is fine.
        vocab_size: SentencePiece vocabulary size.
        seed: SentencePiece training seed.
        valid_fraction: expected fraction of *files* held out for validation.
        test_fraction: expected fraction of *files* held out for test.
        max_bytes: use only the first files of the selection, until their texts reach this many
            bytes (a quick slice); None: all.
        max_file_bytes: skip files larger than this.
        roots: the directories to draw from (default: :func:`source_roots` of this interpreter).
        progress: show tqdm bars while building (the cache hit prints nothing).

    The cache key includes the Python version, the roots and the installed distributions
    (:func:`environment_fingerprint`): installing or upgrading a package means a rebuild.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    roots = source_roots() if roots is None else roots
    settings = _env_python_settings(
        vocab_size, seed, valid_fraction, test_fraction, max_bytes, max_file_bytes, roots
    )
    return _cached_build(
        Path(out_dir),
        "env-python",
        ".lock-env-python",
        settings,
        lambda tmp: _build_env_python(tmp, settings, roots, progress),
    )
