"""The summary that ``scripts/demo.sh`` prints at its end: the table and the margin line.

The summary is the Python block embedded in the script; it is run here on hand-made result
files, so its format and the sign of the margin are checked without training anything (the
full demo runs in ``tests/distributed/test_demo.py``, marked slow).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

#: ``margin (merge - stable): -0.0812 in eval loss, -1.56 % (perplexity x0.922): ...``
MARGIN_LINE = re.compile(
    r"^margin \(merge - stable\): (?P<loss>[+-]\d+\.\d{4}) in eval loss, "
    r"(?P<rel>[+-]\d+\.\d{2}) % \(perplexity x(?P<ratio>\d+\.\d{3})\): (?P<verdict>.+)$",
    re.M,
)


def summary_source() -> str:
    """The Python heredoc of scripts/demo.sh (between ``<<'PY'`` and ``PY``)."""
    text = (ROOT / "scripts" / "demo.sh").read_text()
    return re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S).group(1)


def result(loss: float, vmax: float = 0.1, vmin: float = 0.05) -> dict:
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "moe": {"mean_global_max_violation": vmax, "mean_global_min_violation": vmin},
    }


def run_summary(tmp_path: Path, stable: float, merged: float, method: str = "ema") -> str:
    stable_json = result(stable)
    stable_json["wsm_readouts"] = [
        {"iteration": 500, "method": method, **result(merged + 0.01)},
        {"iteration": 600, "method": method, **result(merged)},
    ]
    (tmp_path / "stable.json").write_text(json.dumps(stable_json))
    (tmp_path / "merged.json").write_text(json.dumps(result(merged)))
    proc = subprocess.run(
        [sys.executable, "-", str(tmp_path), method],
        input=summary_source(),
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def parse_margin(output: str) -> dict[str, str]:
    match = MARGIN_LINE.search(output)
    assert match, output
    return match.groupdict()


@pytest.mark.parametrize(
    ("stable", "merged", "verdict"),
    [(5.2, 5.1, "the merge is better"), (5.6040, 5.6199, "the merge is NOT better")],
)
def test_demo_summary_prints_the_margin(tmp_path, stable, merged, verdict):
    out = run_summary(tmp_path, stable, merged)
    assert "stable (last iterate)" in out and "WSM merge, ema" in out
    assert "readout in training @600" in out
    m = parse_margin(out)
    assert float(m["loss"]) == pytest.approx(merged - stable, abs=1e-4)
    assert float(m["rel"]) == pytest.approx(100 * (merged - stable) / stable, abs=0.01)
    assert float(m["ratio"]) == pytest.approx(math.exp(merged - stable), abs=1e-3)
    assert m["verdict"] == verdict
