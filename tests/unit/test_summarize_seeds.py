"""The across-seed summary of examples/wsm_vs_wsd.sh outputs: paired differences, rankings and
violation counts computed from the per-seed evaluation files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture
def summarize(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # it imports plot_wsm_vs_wsd
    spec = importlib.util.spec_from_file_location("summarize_seeds",
                                                  ROOT / "examples" / "summarize_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed(root: Path, name: str, losses: dict[str, float], vmax: dict[str, float]) -> Path:
    out = root / name
    (out / "eval").mkdir(parents=True)
    for ckpt, loss in losses.items():
        (out / "eval" / f"{ckpt}.json").write_text(json.dumps(
            {"loss": loss, "perplexity": math.exp(loss),
             "moe": {"mean_global_max_violation": vmax[ckpt],
                     "mean_global_min_violation": 0.1}}))
    hist = [{"iteration": i, "loss": 5.0 - i / 100} for i in range(1, 101)]
    (out / "stable").mkdir()
    (out / "stable" / "result.json").write_text(json.dumps({"train_history": hist}))
    return out


def test_paired_differences_rankings_and_counts(summarize, tmp_path, capsys):
    names = ["stable", "wsd", "merged_1sqrt", "merged_mean", "merged_ema", "grid_I10_N2",
             "merged_1sqrt_w400"]
    a = _seed(tmp_path, "seedA", dict(zip(names, [3.0, 2.9, 2.95, 2.85, 2.88, 2.97, 2.8])),
              dict(zip(names, [0.3, 0.2, 0.25, 0.1, 0.3, 0.2, 0.2])))
    b = _seed(tmp_path, "seedB", dict(zip(names, [3.1, 3.0, 2.99, 3.02, 2.98, 3.05, 2.9])),
              dict(zip(names, [0.3, 0.2, 0.1, 0.1, 0.1, 0.2, 0.2])))
    data = summarize.load_seeds([a, b])
    paired = summarize.paired_table(data, summarize.WSD)
    row = next(r for r in paired.splitlines() if r.startswith("| WSM merge 1-sqrt"))
    assert "+0.0500 | -0.0100 | +0.0200 | 1/2 |" in row
    row = next(r for r in paired.splitlines() if r.startswith("| WSM merge mean"))
    assert row.endswith("| 1/2 |") and "-0.0500" in row
    ranking = summarize.merge_ranking(data).splitlines()
    assert ranking[2] == "| seedA | mean 2.8500 < EMA 2.8800 < 1-sqrt 2.9500 |"
    vio = summarize.violation_table(data)
    assert next(r for r in vio.splitlines() if r.startswith("| WSM merge mean")).split(" | ")[2] \
        == "2/2"
    assert summarize.window_slope(a, 50, edge=10) == pytest.approx((5.0 - 0.555, 5.0 - 0.955))
    assert summarize.main([str(a), str(b), "--window-iters", "50"]) == 0
    out = capsys.readouterr().out
    assert "| WSM merge 1-sqrt, 400-it window | -0.1000 | -0.1000 | -0.1000 | 2/2 |" in out
    assert "grid 1-sqrt (10 it, 2)" in out and "| seedB | 4.3950 | 4.0950 | 0.3000 |" in out
