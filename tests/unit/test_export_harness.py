"""Offline lm-eval tasks built from held-out documents: deterministic, well-formed items."""

from __future__ import annotations

import json

import pytest

from megatron_wsm.export import harness

TEXTS = [
    " ".join(f"d{d}w{i}" for i in range(300)) for d in range(6)
] + ["too short to hold an item"]


def test_cloze_items_are_deterministic_and_correct():
    items = harness.cloze_items(TEXTS, seed=3)
    assert items == harness.cloze_items(TEXTS, seed=3)
    assert items != harness.cloze_items(TEXTS, seed=4)  # choice order depends on the seed
    assert len(items) == 6 * harness.MAX_ITEMS_PER_DOC
    for item in items:
        choices, label = item["choices"], item["label"]
        assert len(choices) == harness.CHOICES == len(set(choices))
        doc = next(t for t in TEXTS if t.startswith(item["context"]))
        # The labelled choice is the document's true continuation; the others are not.
        assert doc[len(item["context"]):].startswith(choices[label])
        assert sum(doc[len(item["context"]):].startswith(c) for c in choices) == 1
        assert all(len(c.split()) == harness.SPAN_WORDS for c in choices)
        assert all(len(c) <= harness.MAX_CHOICE_CHARS for c in choices)


def test_cloze_items_skip_long_choices():
    long_texts = [" ".join("x" * 40 + str(i) for i in range(200)) for _ in range(5)]
    assert harness.cloze_items(long_texts) == []


def test_write_tasks(tmp_path):
    names = harness.write_tasks(tmp_path, TEXTS)
    assert names == list(harness.TASKS)
    docs = [json.loads(x) for x in (tmp_path / "heldout_docs.jsonl").read_text().splitlines()]
    assert [d["text"] for d in docs] == TEXTS
    for name in names:
        yaml = (tmp_path / f"{name}.yaml").read_text()
        assert f"task: {name}" in yaml and str(tmp_path) in yaml and "dataset_path: json" in yaml
    with pytest.raises(ValueError, match="too short"):
        harness.write_tasks(tmp_path / "x", TEXTS[-1:])
