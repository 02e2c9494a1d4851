"""Make the preprocess_data parity fixtures: inputs, tokenizers, and Megatron-LM's own outputs.

Run from the repository root with the project's venv (see README.md in this directory)::

    .venv/bin/python tests/data/megatron_lm/preprocess/make_reference.py /tmp/mlm

``inputs`` writes ``corpus.jsonl`` (Python's own ``pydoc_data`` help topics, cut short, plus
edge cases: an empty text, a list of sentences, non-ASCII text, a second JSON key) and
``null.jsonl`` (space-separated ids, for ``NullTokenizer``); ``tokenizers`` trains a small
byte-level BPE with the ``tokenizers`` library and saves it as a Hugging Face tokenizer
directory (``hf/``, transformers' ``PreTrainedTokenizerFast.save_pretrained``) and as GPT-2
``gpt2/vocab.json`` + ``gpt2/merges.txt``, and trains a sentencepiece model
(``spm.model``, megatron-wsm's ``train_sentencepiece``); ``megatron`` runs Megatron-LM's
``tools/preprocess_data.py`` (the checkout given as argument) once per tokenizer type into
``megatron_lm/``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (name, Megatron-LM tokenizer flags, input file) of each reference run.
RUNS: list[tuple[str, list[str], str]] = [
    ("hf", ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "hf"], "corpus"),
    (
        "gpt2",
        [
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "gpt2/vocab.json",
            "--merge-file", "gpt2/merges.txt", "--legacy-tokenizer",
        ],
        "corpus",
    ),
    ("sp", ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "spm.model"],
     "corpus"),
    ("gptsp", ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
               "spm.model"], "corpus"),
    ("llama2", ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "spm.model"],
     "corpus"),
    ("null", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "511"], "null"),
]  # fmt: skip


def make_inputs() -> None:
    """corpus.jsonl and null.jsonl."""
    from pydoc_data.topics import topics

    records: list[dict] = []
    for i, name in enumerate(sorted(topics)[:14]):
        records.append({"id": i, "text": topics[name][:360], "title": name})
    records.insert(3, {"id": 100, "text": "", "title": "empty"})
    records.insert(
        6,
        {
            "id": 101,
            "text": ["First sentence of a list.", "", "Second one,\n  indented."],
            "title": "sentences",
        },
    )
    records.insert(9, {"id": 102, "text": "naïve café — 日本語 ✓ tab\there", "title": "utf-8"})
    with open(HERE / "corpus.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(HERE / "null.jsonl", "w", encoding="utf-8") as f:
        for i in range(8):
            f.write(
                json.dumps({"text": " ".join(str((i * 37 + j * 11) % 511) for j in range(i + 3))})
                + "\n"
            )


def _texts() -> list[str]:
    out = []
    with open(HERE / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out.extend(text if isinstance(text, list) else [text])
    return out


def make_tokenizers() -> None:
    """hf/, gpt2/vocab.json + merges.txt, spm.model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    eod = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(), vocab_size=420, min_frequency=2, special_tokens=[eod])
    (HERE / "gpt2").mkdir(exist_ok=True)
    bpe.save_model(str(HERE / "gpt2"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eod, eos_token=eod, unk_token=eod
    )
    fast.save_pretrained(str(HERE / "hf"))
    # transformers 5 records its own "TokenizersBackend" class; PreTrainedTokenizerFast (the
    # same tokenizer.json) also loads in transformers 4.
    config_path = HERE / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    from megatron_wsm.data.spm_training import train_sentencepiece

    model = train_sentencepiece(_texts() * 4, HERE / "spm_tmp", vocab_size=400, seed=1234)
    os.replace(model, HERE / "spm.model")
    for leftover in HERE.glob("spm_tmp*"):
        leftover.unlink()


def run_megatron(mlm_dir: Path) -> None:
    """Megatron-LM's tools/preprocess_data.py, once per RUNS entry, into megatron_lm/."""
    # megatron.core from the venv (the same 0.16.1 code), megatron.training from the checkout:
    # `megatron` is a namespace package in both.
    sys.path.append(str(mlm_dir))
    import megatron_wsm.mcore_prelude  # noqa: F401  (megatron-core's CPU import shims)

    # megatron.training.initialize imports triton kernels (absent from CPU torch): a stand-in.
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules.setdefault(stub.__name__, stub)

    out = HERE / "megatron_lm"
    out.mkdir(exist_ok=True)
    os.chdir(HERE)
    for name, flags, source in RUNS:
        sys.argv = [
            "preprocess_data.py", "--input", f"{source}.jsonl", "--output-prefix",
            f"megatron_lm/{name}", "--workers", "1", "--append-eod", *flags,
        ]  # fmt: skip
        runpy.run_path(str(mlm_dir / "tools" / "preprocess_data.py"), run_name="__main__")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    make_inputs()
    make_tokenizers()
    run_megatron(Path(sys.argv[1]))
