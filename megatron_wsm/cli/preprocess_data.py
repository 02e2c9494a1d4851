"""``preprocess_data``: tokenize text into megatron-core indexed datasets (``.bin`` + ``.idx``).

Examples::

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model data/tok.model --output-prefix data/corpus --append-eod --workers 4
    # -> data/corpus_text_document.bin / .idx ; train with --data-path data/corpus_text_document

    python tools/preprocess_data.py --input notes/*.txt --tokenizer-model data/tok.model \\
        --output-prefix data/notes --append-eod               # one document per .txt file

Megatron-LM's tokenizer flags (``--tokenizer-type``, ``--tokenizer-model``, ``--vocab-file``,
``--merge-file``, ``--vocab-size``, ``--tokenizer-hf-use-fast``,
``--tokenizer-hf-include-special-tokens``, ``--tiktoken-pattern``,
``--tiktoken-num-special-tokens``, ``--tokenizer-special-tokens``) build the same tokenizer as
Megatron-LM's ``tools/preprocess_data.py`` (megatron-core's tokenizer library,
``megatron_wsm.data.tokenizers``); without ``--tokenizer-type``, ``--tokenizer-model`` is read by
megatron-wsm's own SentencePiece wrapper (same ids for the models ``tools/train_tokenizer.py``
trains).

JSON-lines inputs (``.json``/``.jsonl``) give the same ``.bin``/``.idx`` bytes as Megatron-LM's
tool for the same tokenizer (``megatron_wsm.data.preprocess``; tested against its output in
``tests/data/megatron_lm/preprocess``): one JSON object per line, one document per object and
``--json-keys`` key (a list value is a list of sentences), one dataset
``<output-prefix>_<key>_document`` per key, documents without tokens kept as empty documents.
Plain-text inputs (any other extension; not in Megatron-LM) are one document per file, or one per
line / per blank-line-separated paragraph with ``--text-boundary``; their key is ``text`` and
documents that tokenize to nothing are skipped. ``--append-eod`` (recommended for GPT
pretraining) ends every document with the tokenizer's EOD id so samples that span documents
still mark the boundary. ``--split-sentences`` is refused: it needs NLTK's punkt model, which
Megatron-LM downloads at run time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence

from megatron_wsm.cli import command_parser
from megatron_wsm.config.data import TOKENIZER_TYPES, UNSUPPORTED_TOKENIZER_TYPES

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
    tok = p.add_argument_group("tokenizer (Megatron-LM's flags)")
    tok.add_argument(
        "--tokenizer-type",
        default=None,
        choices=[*TOKENIZER_TYPES, *UNSUPPORTED_TOKENIZER_TYPES],
        help="Megatron-LM's tokenizer type (megatron-core's tokenizer library); default: "
        "megatron-wsm's SentencePiece wrapper of --tokenizer-model",
    )
    tok.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model file, a local Hugging Face tokenizer directory "
        "(HuggingFaceTokenizer), or a tiktoken vocabulary .json (TikTokenizer)",
    )
    tok.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    tok.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="NullTokenizer: ids before EOD; TikTokenizer: special tokens + ranks (default "
        "2**17, or the vocabulary file's size when smaller)",
    )
    tok.add_argument(
        "--tiktoken-pattern",
        choices=["v1", "v2"],
        default=None,
        help="TikTokenizer: the pre-tokenizer regex (default v2, megatron-core's)",
    )
    tok.add_argument(
        "--tiktoken-num-special-tokens",
        type=int,
        default=1000,
        help="TikTokenizer: ids below this are special tokens (default 1000)",
    )
    tok.add_argument(
        "--tokenizer-special-tokens",
        nargs="+",
        default=None,
        help="TikTokenizer: the named special tokens (must include <unk> <s> </s> <mask> <pad> "
        "<cls> <sep>; </s> is the EOD)",
    )
    tok.add_argument(
        "--tokenizer-hf-use-fast",
        action="store_true",
        help="HuggingFaceTokenizer: load the fast tokenizer",
    )
    tok.add_argument(
        "--tokenizer-hf-include-special-tokens",
        action="store_true",
        help="HuggingFaceTokenizer: add the tokenizer's special tokens (e.g. BOS) to each text",
    )
    p.add_argument(
        "--split-sentences",
        action="store_true",
        help="refused: needs NLTK's punkt model, which Megatron-LM downloads at run time",
    )
    mlm = p.add_argument_group(
        "Megatron-LM's other flags (accepted so its command lines run; see each)"
    )
    mlm.add_argument(
        "--legacy-tokenizer",
        action="store_true",
        help="GPT2BPETokenizer: accepted (our GPT-2 tokenizer gives the legacy ids); refused "
        "for the other types, whose legacy ids differ",
    )
    mlm.add_argument(
        "--trust-remote-code", action="store_true", help="refused: nothing from a tokenizer runs"
    )
    mlm.add_argument("--partitions", type=int, default=1, help="only 1 (one output)")
    mlm.add_argument("--log-interval", type=int, default=1000, help="unused: a progress bar")
    mlm.add_argument("--keep-newlines", action="store_true", help="only with --split-sentences")
    mlm.add_argument("--lang", default="english", help="only with --split-sentences")
    mlm.add_argument(
        "--keep-sequential-samples", action="store_true", help="only with --partitions > 1"
    )
    mlm.add_argument("--vocab-extra-ids", type=int, default=0, help="only 0 (T5's)")
    mlm.add_argument("--tokenizer-metadata", nargs="+", default=None, help="refused: not wired")
    mlm.add_argument(
        "--tiktoken-special-tokens",
        nargs="+",
        default=None,
        help="refused: Megatron-LM's tool ignores this deprecated name (its default special "
        "tokens apply); give --tokenizer-special-tokens",
    )
    mlm.add_argument(
        "--tokenizer-sentencepiece-legacy",
        action="store_true",
        help="refused: megatron-core's legacy sentencepiece mode is not wired",
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


def iter_documents(paths: Sequence[str], boundary: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, ``{"text": document}``) of plain-text files, split by ``boundary``."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for i, doc in enumerate(_split_text(f.read(), boundary), 1):
                yield f"{path} (document {i})", {"text": doc}


def count_documents(paths: Sequence[str], boundary: str) -> int:
    """Number of records the inputs hold (for the progress bar)."""
    total = 0
    for path in paths:
        if _is_json(path):
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            with open(path, encoding="utf-8") as f:
                total += len(_split_text(f.read(), boundary))
    return total


def tokenizer_args(args: argparse.Namespace) -> dict:
    """``build_tokenizer`` keyword arguments of the parsed flags."""
    return {
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": args.tokenizer_model,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "vocab_size": args.vocab_size,
        "hf_use_fast": args.tokenizer_hf_use_fast,
        "hf_include_special_tokens": args.tokenizer_hf_include_special_tokens,
        "tiktoken_pattern": args.tiktoken_pattern,
        "tiktoken_num_special_tokens": args.tiktoken_num_special_tokens,
        "tokenizer_special_tokens": args.tokenizer_special_tokens,
    }


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the flags cannot run, or None."""
    if args.workers < 1:
        return "--workers must be >= 1"
    if args.split_sentences:
        return (
            "--split-sentences is not supported: it needs NLTK's punkt sentence model, which "
            "Megatron-LM downloads at run time (this tool runs offline); split the text into "
            "a JSON list of sentences instead (each list item is one sequence, as Megatron-LM "
            "writes it)"
        )
    if args.legacy_tokenizer and args.tokenizer_type != "GPT2BPETokenizer":
        return (
            "--legacy-tokenizer is supported with GPT2BPETokenizer only (same ids); Megatron-LM's "
            f"legacy {args.tokenizer_type} gives other ids than its default"
        )
    if args.trust_remote_code:
        return "--trust-remote-code is refused: code in a tokenizer directory is never run"
    if args.partitions != 1:
        return "--partitions must be 1 (one input, one output; use --workers for speed)"
    if args.vocab_extra_ids != 0:
        return "--vocab-extra-ids is for T5's legacy tokenizers; not supported"
    for flag in ("tokenizer_metadata", "tokenizer_sentencepiece_legacy"):
        if getattr(args, flag):
            return f"--{flag.replace('_', '-')} is not supported (not wired to the tokenizers)"
    if args.tokenizer_special_tokens and args.tokenizer_type != "TikTokenizer":
        return "--tokenizer-special-tokens is wired for --tokenizer-type TikTokenizer only"
    if args.tiktoken_special_tokens:
        return (
            "--tiktoken-special-tokens is refused: Megatron-LM's tools/preprocess_data.py ignores "
            "this deprecated name (only its trainer maps it to --tokenizer-special-tokens), so "
            "the data would not match; give --tokenizer-special-tokens"
        )
    json_inputs = [p for p in args.input if _is_json(p)]
    if json_inputs and len(json_inputs) != len(args.input):
        return "give JSON-lines inputs or plain-text inputs, not both"
    for path in args.input:
        if not os.path.isfile(path):
            return f"no such file: {path}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    refusal = _refusal(args)
    if refusal is not None:
        print(f"{PROG}: error: {refusal}", file=sys.stderr)
        return 2
    is_json = _is_json(args.input[0])
    keys = args.json_keys if is_json else ["text"]

    # megatron-core warns at import about missing Transformer Engine/Apex: noise for this tool.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from tqdm import tqdm

        from megatron_wsm.data.preprocess import RecordError, json_records, write_datasets
        from megatron_wsm.data.tokenizers import TokenizerError, build_tokenizer

    tok_args = tokenizer_args(args)
    try:
        tokenizer = build_tokenizer(**tok_args)
    except TokenizerError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    records = (
        json_records(args.input) if is_json else iter_documents(args.input, args.text_boundary)
    )
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in keys}
    n_records = count_documents(args.input, args.text_boundary)
    t0 = time.perf_counter()
    with tqdm(total=n_records, unit="doc", disable=args.quiet) as bar:
        try:
            stats = write_datasets(
                records,
                tokenizer,
                prefixes,
                append_eod=args.append_eod,
                keep_empty=is_json,
                workers=args.workers,
                tokenizer_args=tok_args,
                on_record=lambda: bar.update(1),
            )
        except (OSError, RecordError) as err:
            bar.close()
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - t0
    for s in stats.values():
        empty = "written empty" if is_json else "skipped"
        print(
            f"{PROG}: {s.prefix}.bin/.idx: {s.documents} documents, {s.tokens} tokens "
            f"({s.text_bytes} text bytes, {s.empty_documents} empty {empty}) in {seconds:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
