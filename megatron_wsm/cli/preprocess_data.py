"""``preprocess_data``: tokenize text into megatron-core indexed datasets (``.bin`` + ``.idx``).

Examples::

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model data/tok.model --output-prefix data/corpus --append-eod --workers 4
    # -> data/corpus_text_document.bin / .idx ; train with --data-path data/corpus_text_document

    python tools/preprocess_data.py --input notes/*.txt --tokenizer-model data/tok.model \\
        --output-prefix data/notes --append-eod               # one document per .txt file

Flags and output naming follow Megatron-LM's ``tools/preprocess_data.py``: one JSON object per
line, one document per object, and one dataset ``<output-prefix>_<key>_document`` per JSON key.
Plain-text inputs (any extension other than ``.json``/``.jsonl``) are one document per file, or
one per line / per blank-line-separated paragraph with ``--text-boundary``; their key is
``text``. Documents that tokenize to nothing are skipped. ``--append-eod`` (recommended for GPT
pretraining) ends every document with the tokenizer's EOD id so samples that span documents
still mark the boundary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence

from megatron_wsm.cli import command_parser

PROG = "preprocess_data"
EPILOG = """examples:
  preprocess_data.py --input corpus.jsonl --json-keys text --tokenizer-model tok.model \\
      --output-prefix data/corpus --append-eod --workers 4   # -> data/corpus_text_document
  preprocess_data.py --input notes/*.txt --tokenizer-model tok.model \\
      --output-prefix data/notes --append-eod                # one document per file
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = command_parser(
        PROG, "Tokenize documents into megatron-core indexed datasets (.bin/.idx).", EPILOG
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".jsonl/.json (one JSON object per line) or plain text files",
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys to tokenize, one dataset per key (default: text)",
    )
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument(
        "--tokenizer-type",
        default="SentencePieceTokenizer",
        choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer"],
        help="accepted for Megatron-LM compatibility; only SentencePiece models are supported",
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        help="writes <prefix>_<key>_document.bin/.idx (directories are created)",
    )
    p.add_argument(
        "--append-eod", action="store_true", help="append the EOD id after every document"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (default 1: in-process)"
    )
    p.add_argument(
        "--text-boundary",
        choices=["file", "line", "paragraph"],
        default="file",
        help="plain-text inputs: one document per file (default), per non-empty line, or per "
        "paragraph (separated by blank lines)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _is_json(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def _split_text(text: str, boundary: str) -> list[str]:
    if boundary == "line":
        return [line for line in text.split("\n") if line.strip()]
    if boundary == "paragraph":
        return [para.strip("\n") for para in re.split(r"\n[ \t]*\n", text) if para.strip()]
    return [text]


def iter_documents(paths: Sequence[str], key: str, boundary: str) -> Iterator[str]:
    """Document texts of ``paths`` for one JSON ``key`` (plain-text files use ``boundary``)."""
    for path in paths:
        if _is_json(path):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if key not in record:
                        raise KeyError(f"{path}:{lineno}: no key {key!r} in the JSON object")
                    yield str(record[key])
        else:
            with open(path, encoding="utf-8") as f:
                yield from _split_text(f.read(), boundary)


def count_documents(paths: Sequence[str], boundary: str) -> int:
    """Number of documents :func:`iter_documents` will yield per key (for the progress bar)."""
    total = 0
    for path in paths:
        if _is_json(path):
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            with open(path, encoding="utf-8") as f:
                total += len(_split_text(f.read(), boundary))
    return total


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print(f"{PROG}: error: --workers must be >= 1", file=sys.stderr)
        return 2
    for path in [*args.input, args.tokenizer_model]:
        if not os.path.isfile(path):
            print(f"{PROG}: error: no such file: {path}", file=sys.stderr)
            return 2
    keys = args.json_keys if any(_is_json(p) for p in args.input) else ["text"]

    # megatron-core warns at import about missing Transformer Engine/Apex: noise for this tool.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from tqdm import tqdm

        from megatron_wsm.data.indexed import write_indexed_dataset
        from megatron_wsm.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    n_docs = count_documents(args.input, args.text_boundary)
    for key in keys:
        prefix = f"{args.output_prefix}_{key}_document"
        t0 = time.perf_counter()
        with tqdm(total=n_docs, unit="doc", desc=key, disable=args.quiet) as bar:
            try:
                stats = write_indexed_dataset(
                    iter_documents(args.input, key, args.text_boundary),
                    tokenizer,
                    prefix,
                    append_eod=args.append_eod,
                    workers=args.workers,
                    on_document=lambda _n: bar.update(1),
                )
            except (OSError, KeyError, ValueError) as err:
                bar.close()
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                print(f"{PROG}: error: {message}", file=sys.stderr)
                return 1
        seconds = time.perf_counter() - t0
        print(
            f"{PROG}: {prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
            f"({stats.text_bytes} text bytes, {stats.empty_documents} empty skipped) "
            f"in {seconds:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
