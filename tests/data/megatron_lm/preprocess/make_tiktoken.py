"""Make the TikTokenizer parity fixture: a tiny tiktoken vocabulary and Megatron-LM's output.

Run from the repository root with the project's venv (see README.md in this directory)::

    .venv/bin/python tests/data/megatron_lm/preprocess/make_tiktoken.py /tmp/mlm

``vocab`` writes ``tiktoken/vocab.json`` in Megatron-LM's tiktoken JSON format (a list of
``{"rank", "token_bytes", "token_str"}``, ``token_bytes`` base64): the 256 single bytes, then
``MERGES`` byte-pair merges learned greedily on ``corpus.jsonl`` (the most frequent adjacent
pair inside each pre-token, ties broken by the smaller pair; deterministic). ``megatron`` runs
Megatron-LM's ``tools/preprocess_data.py`` with ``TIKTOKEN_FLAGS`` on ``corpus.jsonl`` and on
``tiktoken/specials.jsonl`` (texts holding special-token strings) into ``megatron_lm/``
(through ``make_reference.run_megatron``'s stand-ins). Nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Merges after the 256 byte tokens (the vocabulary has 256 + MERGES ranks).
MERGES = 44
#: Megatron-LM's flags of the reference run (vocabulary = 16 special tokens + 300 ranks).
TIKTOKEN_FLAGS = [
    "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "tiktoken/vocab.json",
    "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "16", "--vocab-size", "316",
]  # fmt: skip


def _words() -> Counter[bytes]:
    # Pre-tokens: whitespace-separated words with their leading space (close to tiktoken's
    # patterns, enough for a fixture).
    counts: Counter[bytes] = Counter()
    with open(HERE / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            for part in text if isinstance(text, list) else [text]:
                for i, word in enumerate(part.split(" ")):
                    counts[((" " if i else "") + word).encode("utf-8")] += 1
    return counts


def learn_merges(n: int) -> list[bytes]:
    """``n`` merged tokens, most frequent adjacent pair first."""
    words = {w: [bytes([b]) for b in w] for w in _words()}
    freq = _words()
    merged: list[bytes] = []
    for _ in range(n):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += freq[w]
        (a, b), _count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged.append(a + b)
        for w, parts in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            words[w] = out
    return merged


#: Texts holding special-token strings: megatron-core's TikTokenizer encodes them as the
#: special ids (``allowed_special="all"``; ``</s>`` is the EOD), Megatron-LM's legacy one would
#: not.
SPECIAL_TEXTS = [
    "a </s> inside a text",
    "<SPECIAL_9>, <mask> and <unk> are specials; <SPECIAL_16> and <s > are not",
    "naïve café — 日本語 ✓",
]


def make_inputs() -> None:
    """tiktoken/specials.jsonl."""
    (HERE / "tiktoken").mkdir(exist_ok=True)
    with open(HERE / "tiktoken" / "specials.jsonl", "w", encoding="utf-8") as f:
        for text in SPECIAL_TEXTS:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def make_vocab() -> None:
    """tiktoken/vocab.json."""
    tokens = [bytes([i]) for i in range(256)] + learn_merges(MERGES)
    entries = [
        {
            "rank": rank,
            "token_bytes": base64.b64encode(tok).decode("ascii"),
            "token_str": tok.decode("utf-8", errors="replace"),
        }
        for rank, tok in enumerate(tokens)
    ]
    (HERE / "tiktoken").mkdir(exist_ok=True)
    (HERE / "tiktoken" / "vocab.json").write_text(json.dumps(entries) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import make_reference

    make_vocab()
    make_inputs()
    make_reference.RUNS[:] = [
        ("tiktoken", TIKTOKEN_FLAGS, "corpus"),
        ("tiktoken_specials", TIKTOKEN_FLAGS, "tiktoken/specials"),
    ]
    make_reference.run_megatron(Path(sys.argv[1]))
