"""``train_tokenizer``: train the byte-fallback SentencePiece BPE tokenizer.

Examples::

    python tools/train_tokenizer.py --embedded --output-prefix data/tok            # train split
    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 8192 \\
        --output-prefix data/tok
    python tools/train_tokenizer.py --input notes.txt --output-prefix data/tok     # lines

Writes ``<prefix>.model`` and ``<prefix>.vocab``. ``--embedded`` trains on the *train* documents
of the embedded corpus (as :func:`megatron_wsm.data.prepare.prepare_embedded_data` does), so the
held-out documents stay unseen. Training options are in :mod:`megatron_wsm.data.tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence

from megatron_wsm.cli import command_parser

PROG = "train_tokenizer"
EPILOG = """examples:
  train_tokenizer.py --embedded --output-prefix data/tok
  train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 8192 --output-prefix tok
  train_tokenizer.py --input notes.txt --output-prefix data/tok
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = command_parser(
        PROG, "Train a deterministic byte-fallback SentencePiece BPE tokenizer.", EPILOG
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="training text: .jsonl/.json files (one JSON object per line, text under "
        "--json-keys) or plain text files (every line is a training sentence)",
    )
    src.add_argument(
        "--embedded",
        action="store_true",
        help="train on the train split of the embedded corpus (Python's own documentation)",
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding text")
    p.add_argument("--vocab-size", type=int, default=4096, help="number of pieces (default 4096)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="use at most this many lines, sampled with --seed beyond it (default 2000000)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.05,
        help="with --embedded: fraction of documents held out as valid (default 0.05)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.05,
        help="with --embedded: fraction of documents held out as test (default 0.05)",
    )
    return p


def _is_json(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def iter_input_texts(paths: Sequence[str], json_keys: Sequence[str]) -> Iterator[str]:
    """Texts of the given files: JSON Lines records (each key), or each plain file whole."""
    for path in paths:
        if _is_json(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        for key in json_keys:
                            yield record[key]
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # Imported here so --help answers without loading sentencepiece.
    from megatron_wsm.data.spm_training import train_sentencepiece

    t0 = time.perf_counter()
    if args.embedded:
        from megatron_wsm.data.corpus import embedded_corpus, split_documents

        splits = split_documents(
            embedded_corpus().documents, args.valid_fraction, args.test_fraction
        )
        texts: Iterator[str] = (d.text for d in splits["train"])
        source = f"embedded corpus, {len(splits['train'])} train documents"
    else:
        texts = iter_input_texts(args.input, args.json_keys)
        source = ", ".join(args.input)
    try:
        model = train_sentencepiece(
            texts,
            args.output_prefix,
            vocab_size=args.vocab_size,
            seed=args.seed,
            input_sentence_size=args.input_sentence_size,
        )
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(
        f"{PROG}: trained {args.vocab_size} pieces on {source} in "
        f"{time.perf_counter() - t0:.1f}s -> {model}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
