"""The ``env-python`` corpus: the ``.py`` source of the running Python environment.

Nothing is downloaded. The corpus is the Python source (code, comments and docstrings) of the
standard library and the installed packages of the interpreter that runs the build, selected by
fixed rules:

* **Roots** (:func:`source_roots`): ``sysconfig.get_paths()`` ``stdlib``, ``purelib`` and
  ``platlib`` of the running interpreter (in a virtual environment: the base installation's
  standard library and the environment's ``site-packages``). A root equal to, or inside, an
  earlier one is dropped; the standard library's own top-level ``site-packages`` and
  ``dist-packages`` are skipped (installed packages of the *base* interpreter, not stdlib).
* **Files** (:func:`list_source_files`): every regular ``*.py`` file, walked without following
  directory links, except under directories named ``__pycache__``, ``test`` or ``tests``, or
  starting with ``.`` (test suites are repetitive and hold deliberately odd inputs: bad
  encodings, generated data), and except files larger than ``max_file_bytes`` (256 KiB by
  default: generated tables such as codec maps). A document is named ``<root label>/<path
  relative to the root>`` (``stdlib/json/decoder.py``, ``purelib/torch/nn/functional.py``), so
  names do not depend on where the environment lives. Files are taken root by root (the
  standard library first), in sorted name order within a root.
* **Text** (:func:`clean_source`): strict UTF-8 (a leading BOM dropped; undecodable files are
  skipped and counted), universal newlines, and the **leading comment block removed**: every line
  before the first line that is neither blank nor a ``#`` comment. That is where shebangs, coding
  cookies and license/copyright headers live; comments further down, and license text inside a
  module docstring, are kept. Files that are empty after this are skipped and counted.
* **Dedup** by SHA-256 of the cleaned text: the first file in name order keeps the text, later
  identical copies (vendored packages, empty ``__init__.py`` files) are dropped and counted.
* **Slices**: ``max_bytes`` stops the selection once the kept texts reach that many UTF-8 bytes
  (the file that crosses the limit is kept). A smaller slice is therefore a prefix of a larger
  one, and reading stops early, which makes small test slices fast.

The held-out split is by file, with the same keyed hash of the document name as the embedded
corpus (:func:`megatron_wsm.data.corpus.split_documents`): adding or removing a file never moves
another file between splits. Near-copies of a file (a vendored older version) can land in
different splits; exact copies cannot, since they are deduplicated first.

The selection reads files only and imports nothing, so it runs in the calling process: unlike the
embedded corpus no library can patch what it sees, and a fresh ``python -I -S`` interpreter would
not even see the virtual environment (``-S`` resets ``sys.prefix`` to the base installation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator

from megatron_wsm.data.corpus import Document

#: Bump when the selection or cleaning rules change, so caches keyed on it are rebuilt.
ENV_PYTHON_VERSION = 1

#: Files larger than this are skipped (generated tables, not prose or idiomatic code).
MAX_FILE_BYTES = 256 * 1024

#: Directory names never descended into, at any depth.
SKIP_DIRS = frozenset({"__pycache__", "test", "tests"})

#: Top-level directories of the ``stdlib`` root that hold installed packages, not the stdlib.
STDLIB_SKIP_TOP = frozenset({"site-packages", "dist-packages"})

#: ``sysconfig`` path names used as roots, in this order (also the document-name labels).
ROOT_NAMES = ("stdlib", "purelib", "platlib")


@dataclasses.dataclass(frozen=True)
class SourceRoot:
    """A directory the corpus is drawn from and the label that prefixes its document names."""

    label: str
    path: str


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """A candidate file: its document name, absolute path and size on disk."""

    name: str
    path: str
    size: int


@dataclasses.dataclass
class SelectionStats:
    """What the selection kept and left out (counts of files, and bytes kept)."""

    candidates: int = 0  #: ``.py`` files under the roots within the size cap
    too_large: int = 0  #: skipped: larger than ``max_file_bytes``
    undecodable: int = 0  #: skipped: not UTF-8
    empty: int = 0  #: skipped: nothing left after removing the leading comment block
    duplicates: int = 0  #: skipped: same cleaned text as an earlier file
    documents: int = 0  #: kept
    bytes: int = 0  #: UTF-8 bytes of the kept texts
    truncated: bool = False  #: ``max_bytes`` stopped the selection before the last candidate


def source_roots(paths: dict[str, str] | None = None) -> tuple[SourceRoot, ...]:
    """The roots of the corpus: ``stdlib``, ``purelib``, ``platlib`` of this interpreter.

    ``paths`` replaces ``sysconfig.get_paths()`` (tests). A root that is missing, equal to or
    inside an earlier root is dropped (``platlib`` usually equals ``purelib``).
    """
    paths = sysconfig.get_paths() if paths is None else paths
    roots: list[SourceRoot] = []
    for label in ROOT_NAMES:
        raw = paths.get(label)
        if not raw or not os.path.isdir(raw):
            continue
        path = os.path.realpath(raw)
        if any(path == r.path or path.startswith(r.path + os.sep) for r in roots):
            continue
        roots.append(SourceRoot(label, path))
    return tuple(roots)


def _walk(root: SourceRoot, max_file_bytes: int) -> Iterator[tuple[SourceFile | None, bool]]:
    """(file, too large) for every ``.py`` file under ``root`` outside the skipped directories;
    ``file`` is None when the file is over the cap."""
    for dirpath, dirnames, filenames in os.walk(root.path):
        at_top = dirpath == root.path
        dirnames[:] = [
            d
            for d in dirnames
            if d not in SKIP_DIRS
            and not d.startswith(".")
            and not (at_top and root.label == "stdlib" and d in STDLIB_SKIP_TOP)
        ]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            if not os.path.isfile(path):  # broken links, sockets, ...
                continue
            size = os.path.getsize(path)
            if size > max_file_bytes:
                yield None, True
                continue
            rel = os.path.relpath(path, root.path).replace(os.sep, "/")
            yield SourceFile(f"{root.label}/{rel}", path, size), False


def list_source_files(
    roots: tuple[SourceRoot, ...], max_file_bytes: int = MAX_FILE_BYTES
) -> tuple[list[SourceFile], int]:
    """Candidate files, root by root (in ``roots`` order) and sorted by document name within a
    root, and how many files were over the cap."""
    files: list[SourceFile] = []
    too_large = 0
    for root in roots:
        mine: list[SourceFile] = []
        for file, over in _walk(root, max_file_bytes):
            if over:
                too_large += 1
            elif file is not None:
                mine.append(file)
        # Sorting by name (code-point order) makes the order independent of the file system's.
        files += sorted(mine, key=lambda f: f.name)
    return files, too_large


def strip_leading_comments(text: str) -> str:
    """``text`` without the lines before its first line that is neither blank nor a comment."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return "\n".join(lines[i:])
    return ""


def clean_source(raw: bytes) -> str | None:
    """The corpus text of one file's bytes, or None when the file is not UTF-8.

    Strict UTF-8 (leading BOM dropped), universal newlines, leading comment block removed.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return strip_leading_comments(text)


def select_documents(
    files: list[SourceFile],
    max_bytes: int | None = None,
    on_file: Callable[[int], None] | None = None,
) -> tuple[list[Document], SelectionStats]:
    """Read, clean and deduplicate ``files`` (in the given order) into documents.

    Args:
        files: candidates, normally :func:`list_source_files`' sorted list.
        max_bytes: stop once the kept texts total at least this many UTF-8 bytes (None: all).
        on_file: called with each read file's size on disk (progress).
    """
    stats = SelectionStats(candidates=len(files))
    docs: list[Document] = []
    seen: set[bytes] = set()
    for file in files:
        if max_bytes is not None and stats.bytes >= max_bytes:
            stats.truncated = True
            break
        with open(file.path, "rb") as f:
            raw = f.read()
        if on_file is not None:
            on_file(file.size)
        text = clean_source(raw)
        if text is None:
            stats.undecodable += 1
            continue
        if not text.strip():
            stats.empty += 1
            continue
        encoded = text.encode("utf-8")
        digest = hashlib.sha256(encoded).digest()
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        docs.append(Document(file.name, text))
        stats.documents += 1
        stats.bytes += len(encoded)
    return docs, stats


def environment_fingerprint(roots: tuple[SourceRoot, ...]) -> dict[str, object]:
    """What identifies the environment cheaply: Python version, roots and installed packages.

    The installed distributions (``*.dist-info``/``*.egg-info`` names, which carry versions) of
    every root are listed, so installing, removing or upgrading a package changes the
    fingerprint. Files edited in place are not detected.
    """
    dists: list[str] = []
    for root in roots:
        if root.label == "stdlib":
            continue
        try:
            entries = os.listdir(root.path)
        except OSError:
            continue
        dists += sorted(e for e in entries if e.endswith((".dist-info", ".egg-info")))
    return {
        "python": sys.version,
        "roots": [[r.label, r.path] for r in roots],
        "distributions": hashlib.sha256("\n".join(dists).encode("utf-8")).hexdigest(),
        "num_distributions": len(dists),
    }

