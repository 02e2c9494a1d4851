"""The embedded default corpus: English technical text that ships with every CPython.

Nothing is downloaded. The corpus is a fixed, documented selection:

* every entry of ``pydoc_data.topics.topics`` (the language-reference help topics that
  ``help("assert")`` prints), one document per topic, named ``topic:<key>``;
* the docstrings of a fixed list of pure-Python standard-library modules
  (:data:`STDLIB_MODULES`), one document per module, named ``module:<dotted.name>``. A module's
  document is its own docstring followed by the docstrings of the public classes and functions it
  defines (and the public methods/properties of those classes), each under a heading line that
  names the object.

Order is deterministic (topics sorted by key, then modules sorted by name; members sorted by name)
and independent of ``PYTHONHASHSEED``. The text depends only on the Python version, so numbers
measured on it are comparable across runs and machines that use the same Python. Modules that fail
to import (e.g. ``ssl`` on a build without OpenSSL) are skipped and counted, never fatal.

The held-out split is *by document*: a keyed hash of the document name decides whether a document
is train, valid or test (:func:`split_documents`), so a document never straddles two splits and
the assignment does not change when other documents are added or removed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

#: Bump when the extraction rules change, so caches keyed on it are rebuilt (2: extraction
#: moved to an isolated interpreter, which changed a few docstrings).
CORPUS_VERSION = 2

#: Salt of the split hash; part of the documented split definition (do not change casually).
SPLIT_SALT = "megatron-wsm/split/v1/"

#: Modules whose docstrings form the second half of the corpus. Pure-Python modules present on
#: CPython 3.10-3.13 on Linux; modules removed by PEP 594 and side-effect imports (``this``,
#: ``antigravity``, GUI toolkits) are deliberately absent. Order here does not matter: documents
#: are emitted in sorted order.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast",
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.protocols", "asyncio.queues", "asyncio.runners", "asyncio.streams",
    "asyncio.subprocess", "asyncio.tasks", "asyncio.transports",
    "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "configparser", "contextlib", "copy", "copyreg", "cProfile", "csv", "ctypes", "ctypes.util",
    "dataclasses", "datetime", "dbm", "dbm.dumb", "difflib", "dis", "doctest",
    "email", "email.charset", "email.contentmanager", "email.errors", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.mime.text", "email.parser", "email.policy", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser",
    "http", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress",
    "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale",
    "logging", "logging.config", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "modulefinder", "multiprocessing.connection", "multiprocessing.context",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
    "multiprocessing.queues", "multiprocessing.shared_memory", "multiprocessing.synchronize",
    "netrc", "ntpath", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize",
    "tomllib", "trace", "traceback", "tracemalloc", "types", "typing",
    "unittest", "unittest.case", "unittest.loader", "unittest.main", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser",
    "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util",
    "wsgiref.validate",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server",
    "zipapp", "zipfile", "zipimport", "zoneinfo",
)  # fmt: skip

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable name (the split key) and its text."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
    """The embedded corpus plus what was left out while building it."""

    documents: tuple[Document, ...]
    skipped_modules: tuple[str, ...]  #: modules that failed to import (not fatal)
    empty_modules: tuple[str, ...]  #: modules that imported but define no public docstring


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself, not one inherited from a base class."""
    if inspect.isclass(obj):
        # inspect.getdoc() would fall back to a base class' docstring; we want only text written
        # for this class, so the same base docstring does not repeat across modules.
        doc = obj.__dict__.get("__doc__")
    else:
        doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        return inspect.cleandoc(doc)
    return None


def _defined_in(obj: Any, module_name: str) -> bool:
    """True when ``obj`` was defined by ``module_name`` or one of its private submodules.

    Packages such as ``concurrent.futures`` or ``zoneinfo`` define their public classes in a
    private submodule (``concurrent.futures._base``) and re-export them; those count as the
    package's own. Objects re-exported from other public modules do not, to avoid duplicates.
    """
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    return owner == module_name or owner.startswith(module_name + "._")


def _class_member_docs(cls: type) -> Iterator[tuple[str, str]]:
    """(member name, docstring) of the public methods and properties a class defines itself."""
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property) or inspect.isfunction(member):
            doc = _own_doc(member)
            if doc:
                yield name, doc


def module_document_text(module: Any) -> str:
    """The concatenated docstrings of one module, in a deterministic order.

    Layout: ``Module <name>`` + module docstring, then for every public class/function defined in
    the module (sorted by name) a heading ``<module>.<name>`` and its docstring, and for classes
    the same for their public methods and properties (``<module>.<Class>.<method>``).
    """
    name = module.__name__
    parts: list[str] = []
    doc = _own_doc(module)
    if doc:
        parts.append(f"Module {name}\n\n{doc}")
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not _defined_in(obj, name):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = _own_doc(obj)
        if doc:
            parts.append(f"{name}.{attr}\n\n{doc}")
        if inspect.isclass(obj):
            for member, member_doc in _class_member_docs(obj):
                parts.append(f"{name}.{attr}.{member}\n\n{member_doc}")
    return "\n\n".join(parts)


def _import_quietly(name: str) -> Any:
    """Import a module with its import-time warnings (deprecations) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def extract_corpus_here() -> EmbeddedCorpus:
    """Build the embedded corpus from the modules as imported in *this* process.

    Prefer :func:`embedded_corpus`: a process that has imported other libraries may see patched
    standard-library objects (torch, for one, replaces ``inspect.getfile``), which would change
    the text.
    """
    from pydoc_data.topics import topics  # a plain dict shipped with CPython's stdlib

    docs = [Document(f"topic:{key}", topics[key].strip()) for key in sorted(topics)]
    skipped: list[str] = []
    empty: list[str] = []
    for module_name in sorted(STDLIB_MODULES):
        try:
            module = _import_quietly(module_name)
        except Exception:  # noqa: BLE001 - any import failure means "not on this build"
            skipped.append(module_name)
            continue
        text = module_document_text(module)
        if text:
            docs.append(Document(f"module:{module_name}", text))
        else:
            empty.append(module_name)
    return EmbeddedCorpus(tuple(docs), tuple(skipped), tuple(empty))


def _to_json(corpus: EmbeddedCorpus) -> str:
    return json.dumps(
        {
            "documents": [[d.name, d.text] for d in corpus.documents],
            "skipped_modules": list(corpus.skipped_modules),
            "empty_modules": list(corpus.empty_modules),
        },
        ensure_ascii=True,  # the pipe's encoding then does not matter
    )


def _from_json(payload: str) -> EmbeddedCorpus:
    data = json.loads(payload)
    return EmbeddedCorpus(
        tuple(Document(name, text) for name, text in data["documents"]),
        tuple(data["skipped_modules"]),
        tuple(data["empty_modules"]),
    )


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> EmbeddedCorpus:
    """Build (once per process) the embedded corpus with its skip statistics.

    The extraction runs in a fresh interpreter started with ``-I -S`` (no site-packages, no
    ``.pth`` hooks, no environment variables), running this very file as a script: the text then
    depends only on the Python installation, not on what the calling process imported or patched.
    If that interpreter cannot be started, the corpus is extracted in-process with a warning.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return _from_json(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
        warnings.warn(
            f"isolated corpus extraction failed ({err!r}); extracting in-process, where "
            "libraries imported by this process may alter some docstrings",
            RuntimeWarning,
            stacklevel=2,
        )
        return extract_corpus_here()


def embedded_documents() -> list[Document]:
    """The embedded default corpus as a list of documents (topics first, then modules).

    The result is a fresh list on every call (documents themselves are immutable); the
    expensive part is computed once per process.
    """
    return list(embedded_corpus().documents)


def split_fraction(name: str) -> float:
    """Deterministic position of a document name in [0, 1): a salted SHA-256 of the name."""
    digest = hashlib.sha256((SPLIT_SALT + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(name: str, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Which split (``train``/``valid``/``test``) the document called ``name`` belongs to."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            "need valid_fraction >= 0, test_fraction >= 0 and valid_fraction + test_fraction < 1, "
            f"got {valid_fraction} and {test_fraction}"
        )
    u = split_fraction(name)
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def split_documents(
    docs: Iterable[Document], valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """Split documents into ``train``/``valid``/``test`` by a keyed hash of their names.

    Every document lands in exactly one split; the decision depends only on its name and the two
    fractions (fractions are of the *number of documents*, in expectation, not of tokens). Each
    split keeps the input order. Raises ``ValueError`` on duplicate names, since a name must
    identify one document for the split to be meaningful.
    """
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for doc in docs:
        if doc.name in seen:
            raise ValueError(f"duplicate document name {doc.name!r}")
        seen.add(doc.name)
        out[split_of(doc.name, valid_fraction, test_fraction)].append(doc)
    return out


def write_jsonl(docs: Iterable[Document], path: str | os.PathLike[str]) -> int:
    """Write documents as JSON Lines (``{"name": ..., "text": ...}`` per line).

    The file is written to a temporary name and renamed, so readers never see a partial file.
    Returns the number of documents written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"name": doc.name, "text": doc.text}, ensure_ascii=False))
            f.write("\n")
            count += 1
    os.replace(tmp, path)
    return count


def read_jsonl(path: str | os.PathLike[str], key: str = "text") -> list[Document]:
    """Read a JSON Lines file into documents (name from ``"name"`` if present, else the line)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            docs.append(Document(str(record.get("name", f"{path}:{lineno}")), record[key]))
    return docs


if __name__ == "__main__":
    # Used by embedded_corpus() in an isolated interpreter: dump the corpus as JSON on stdout.
    sys.stdout.write(_to_json(extract_corpus_here()))
