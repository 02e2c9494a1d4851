"""The WSM-vs-WSD example's table: evaluation rows, and lm-eval columns when exported."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("plot_wsm_vs_wsd",
                                               ROOT / "examples" / "plot_wsm_vs_wsd.py")
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _eval(loss: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss),
            "moe": {"mean_global_max_violation": 0.5, "mean_global_min_violation": 0.25}}


def _scores(bpb: float, acc: float) -> dict:
    return {"wsm_heldout_ppl": {"bits_per_byte": bpb, "word_perplexity": 123.45,
                                "byte_perplexity": 2 ** bpb},
            "wsm_heldout_cloze": {"acc": acc, "acc_norm": acc / 2}}


def test_table_without_harness_keeps_five_columns(tmp_path):
    _write(tmp_path / "eval" / "stable.json", _eval(2.0))
    _write(tmp_path / "eval" / "wsd.json", _eval(1.5))
    table = plot.format_table(plot.collect_rows(tmp_path)).splitlines()
    assert table[0].count("|") == 6 and "cloze" not in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| WSM stable (last iterate)", "| WSD (1-sqrt decay)"]


def test_harness_scores_become_columns_of_their_own_row(tmp_path):
    _write(tmp_path / "eval" / "stable.json", _eval(2.0))
    _write(tmp_path / "eval" / "merged_1sqrt.json", _eval(1.75))
    _write(tmp_path / "eval" / "grid_I4_N2.json", _eval(1.8))
    # Scores for the merge and the grid row only: the stable row shows "—", not another's score.
    _write(tmp_path / "harness" / "merged_1sqrt.json", _scores(3.25, 0.5))
    _write(tmp_path / "harness" / "grid_I4_N2.json", _scores(3.5, 0.375))
    lines = plot.format_table(plot.collect_rows(tmp_path)).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[5:] == list(plot.HARNESS_COLUMNS)
    assert lines[1].count("|") == len(header) + 1
    cells = {c[0]: c[1:] for c in
             ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells["WSM stable (last iterate)"][4:] == ["—"] * 4
    assert cells["WSM merge 1-sqrt"][:2] == ["1.7500", f"{math.exp(1.75):.2f}"]
    assert cells["WSM merge 1-sqrt"][4:] == ["3.2500", "123.5", "0.5000", "0.2500"]
    assert cells["grid 1-sqrt (4 it, 2)"][4:] == ["3.5000", "123.5", "0.3750", "0.1875"]


def _tb(run_dir: Path, rows: list[tuple[int, float, float]], valid: dict[int, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from megatron_wsm import metric_names as names

    writer = SummaryWriter(str(run_dir / "tb"))
    for step, loss, lr in rows:
        writer.add_scalar(names.LM_LOSS, loss, step)
        writer.add_scalar(names.LEARNING_RATE, lr, step)
    for step, loss in valid.items():
        writer.add_scalar(names.VALID_LOSS, loss, step)
    writer.close()


def test_histories_come_from_tensorboard_and_a_branch_gets_the_shared_part(tmp_path):
    """result.json of a resumed run holds its last invocation only; the plot reads the
    TensorBoard events (every invocation), and a WSD run branched off the stable run at
    iteration 6 is drawn from iteration 1 with the stable run's first 5 iterations."""
    _tb(tmp_path / "stable", [(i, 10.0 - i, 1.0) for i in range(1, 11)], {5: 4.5, 10: 0.5})
    _tb(tmp_path / "wsd", [(i, 9.0 - i, 1.0 / i) for i in range(6, 11)], {10: 0.25})
    _write(tmp_path / "stable" / "result.json",
           {"train_history": [{"iteration": 10, "loss": 0.0, "lr": 1.0}]})  # resumed: partial
    runs = plot.load_histories(tmp_path)
    stable, wsd = runs["stable"]["train_history"], runs["wsd"]["train_history"]
    assert [h["iteration"] for h in stable] == list(range(1, 11))
    assert [h["iteration"] for h in wsd] == list(range(1, 11))
    assert [h["loss"] for h in wsd[:6]] == [9.0, 8.0, 7.0, 6.0, 5.0, 3.0]
    assert wsd[9]["lr"] == pytest.approx(0.1) and wsd[9]["valid_loss"] == 0.25
    assert [h.get("valid_loss") for h in stable if "valid_loss" in h] == [4.5, 0.5]
    plot.plot(tmp_path, tmp_path / "p.png", 2, "title")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
