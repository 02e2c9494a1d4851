"""Score an exported model with lm-evaluation-harness, offline, on tasks built from held-out text.

    python -m megatron_wsm.export.harness --model runs/x/hf --data-cache-dir data_cache \\
        --output-json runs/x/harness.json

Two tasks, both generated deterministically from the held-out (``valid``) documents of the
embedded corpus — the documents no model of this project trained on — and written as local
JSONL + task YAML, so nothing is downloaded:

- ``wsm_heldout_ppl``: rolling log-likelihood of each whole document (``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte``), lm-eval's perplexity recipe (as its ``wikitext``);
- ``wsm_heldout_cloze``: multiple choice. At fixed word positions of each document the context
  is the text so far and the choices are the true next :data:`SPAN_WORDS` words and the words at
  the same position of other held-out documents, each at most :data:`MAX_CHOICE_CHARS` characters
  (``acc``, ``acc_norm``; chance is 1/:data:`CHOICES`).

Needs ``pip install -e .[hf]`` (lm-eval and its HF backend).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("wsm_heldout_ppl", "wsm_heldout_cloze")
SPAN_WORDS = 4  #: words per cloze choice
#: Longer choices are skipped: a choice must fit a tiny model's context (lm-eval refuses a
#: continuation longer than the model's maximum length).
MAX_CHOICE_CHARS = 32
STRIDE_WORDS = 48  #: one cloze item every this many words of a document
CHOICES = 4
MAX_ITEMS_PER_DOC = 6


def heldout_texts(data_cache_dir: str, vocab_size: int, seed: int) -> list[str]:
    """The held-out documents of the embedded corpus (the split the trainer validates on)."""
    from megatron_wsm.data.corpus import read_jsonl
    from megatron_wsm.data.prepare import prepare_embedded_data

    prepared = prepare_embedded_data(data_cache_dir, vocab_size=vocab_size, seed=seed)
    return [d.text for d in read_jsonl(Path(prepared.root) / "corpus" / "valid.jsonl")]


def _word_ends(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", text)]


def cloze_items(texts: Sequence[str], seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice items from documents; the same texts and seed give the same items."""
    rng = random.Random(seed)
    ends = [_word_ends(t) for t in texts]
    items = []
    for i, text in enumerate(texts):
        for k in range(1, MAX_ITEMS_PER_DOC + 1):
            pos = k * STRIDE_WORDS
            if pos + SPAN_WORDS >= len(ends[i]):
                break
            others = [j for j in range(len(texts)) if j != i and pos + SPAN_WORDS < len(ends[j])]
            if len(others) < CHOICES - 1:
                break
            context = text[: ends[i][pos - 1]]

            def span(j: int, pos: int = pos) -> str:
                return texts[j][ends[j][pos - 1] : ends[j][pos + SPAN_WORDS - 1]]

            truth = span(i)
            if len(truth) > MAX_CHOICE_CHARS:
                continue
            distractors: list[str] = []
            for j in rng.sample(others, len(others)):
                cand = span(j)
                if cand != truth and cand not in distractors and len(cand) <= MAX_CHOICE_CHARS:
                    distractors.append(cand)
                if len(distractors) == CHOICES - 1:
                    break
            if len(distractors) < CHOICES - 1:
                continue
            choices = [truth, *distractors]
            rng.shuffle(choices)
            items.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return items


def write_tasks(out: Path, texts: Sequence[str], seed: int = 0) -> list[str]:
    """Write both tasks' data and YAML under ``out``; returns the task names."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "heldout_docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    items = cloze_items(texts, seed)
    if not items:
        raise ValueError("the held-out documents are too short for cloze items")
    with open(out / "heldout_cloze.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (out / "wsm_heldout_ppl.yaml").write_text(
        "task: wsm_heldout_ppl\n"
        + common
        + f"dataset_kwargs:\n  data_files: {json.dumps(str(out / 'heldout_docs.jsonl'))}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n"
    )
    (out / "wsm_heldout_cloze.yaml").write_text(
        "task: wsm_heldout_cloze\n"
        + common
        + f"dataset_kwargs:\n  data_files: {json.dumps(str(out / 'heldout_cloze.jsonl'))}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return list(TASKS)


def run_harness(
    model_dir: str, tasks_dir: Path, batch_size: int = 8, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """lm-eval's HF backend on ``model_dir`` (fp32, CPU) over our tasks; scores per task."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    result = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=batch_size,
        device="cpu",
        limit=limit,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in result["results"].items():
        scores[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k
        }
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """Build the tasks from the held-out split, run the harness, print and save the scores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF directory (tools/export_hf.py)")
    p.add_argument("--data-cache-dir", default="data_cache", help="the run's --data-cache-dir")
    p.add_argument(
        "--tasks-dir",
        default=None,
        help="where to write the tasks (default: <model>/../<model name>_harness_tasks)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    model = Path(args.model)
    try:
        run = json.loads((model / "wsm_export.json").read_text()).get("run") or {}
    except (OSError, ValueError) as e:
        print(f"error: {model} is not a megatron-wsm export ({e})", file=sys.stderr)
        return 2
    from megatron_wsm.export.hf import embedded_tokenizer_settings

    data, seed = embedded_tokenizer_settings(run)
    texts = heldout_texts(args.data_cache_dir, data.vocab_size, seed)
    tasks_dir = Path(args.tasks_dir or model.parent / f"{model.name}_harness_tasks")
    write_tasks(tasks_dir, texts)
    scores = run_harness(str(model), tasks_dir, args.batch_size, args.limit)
    for task, metrics in sorted(scores.items()):
        print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
