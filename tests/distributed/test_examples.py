"""The example scripts run as a user runs them: bash, torchrun, the tools (issue 9).

Shortened settings (a few iterations of a smaller model) so they fit in CI; the numbers are not
checked for quality, only that every stage ran, produced finite results and its outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest

from tests.helpers import ROOT, TINY_MODEL, _env, free_port

pytestmark = pytest.mark.distributed

#: The model of tests.helpers.TINY_MODEL as the example's MODEL_ARGS (vocab 512 = the data_cache
#: fixture's tokenizer, so no second corpus cache is built).
SMALL_MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
    "--moe-router-topk 2 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 "
    "--vocab-size 512"
)

TABLE_ROWS = [
    "WSM stable (last iterate)",
    "WSD (1-sqrt decay)",
    "WSM merge 1-sqrt",
    "WSM merge mean",
    "WSM merge EMA",
]


def _bash(script: str, env: dict[str, str], args: list[str] = (), timeout: int = 240):
    proc = subprocess.run(
        ["bash", str(ROOT / script), *args],
        cwd=ROOT,
        env={**_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def test_wsm_vs_wsd_short(data_cache, tmp_path):
    out = tmp_path / "wsm_vs_wsd"
    env = {
        "OUT": str(out),
        "ITERS": "20",
        "WSM_INTERVAL": "2",  # window of 20 % = 4 iterations: 3 checkpoints
        "EVAL_ITERS": "2",
        "LOG_INTERVAL": "1",
        "DATA_CACHE": data_cache,
        "MODEL_ARGS": SMALL_MODEL,
        # Training keeps the example's 2-process EP=2 launch; merging on one process saves a
        # torchrun start per merge (the 2-rank merge has its own tests).
        "MERGE_NPROC": "1",
    }
    stdout = _bash("examples/wsm_vs_wsd.sh", env).stdout

    # One table with every checkpoint and finite numbers.
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"\| (.+?) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$", line)
        if m and m.group(1) in TABLE_ROWS:
            rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
    assert sorted(rows) == sorted(TABLE_ROWS), stdout
    for label, (loss, ppl, vmax, vmin) in rows.items():
        assert math.isfinite(loss) and math.isfinite(ppl), (label, loss, ppl)
        assert ppl == pytest.approx(math.exp(loss), rel=2e-4)  # both rounded in print
        assert vmax >= 0 and 0 <= vmin <= 1, (label, vmax, vmin)
    assert (out / "table.md").read_text().count("\n") == len(TABLE_ROWS) + 2

    png = out / "wsm_vs_wsd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Equal tokens; the WSD run decays to 0 over the last 4 iterations, the stable one does not.
    wsd = json.loads((out / "wsd" / "result.json").read_text())
    stable = json.loads((out / "stable" / "result.json").read_text())
    assert wsd["consumed_tokens"] == stable["consumed_tokens"]
    for run in (wsd, stable):
        assert all(math.isfinite(h["loss"]) for h in run["train_history"])
    assert wsd["train_history"][-1]["lr"] < stable["train_history"][-1]["lr"]
    merge = json.loads((out / "merged_1sqrt" / "wsm_merge_provenance.json").read_text())
    assert [i["iteration"] for i in merge["inputs"]] == [16, 18, 20]

    # Resumable: a second run skips every stage and prints the same table.
    again = _bash("examples/wsm_vs_wsd.sh", env).stdout
    assert "== train" not in again and "== merge merged" not in again, again
    assert "== evaluate" not in again, again
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table == [line for line in again.splitlines() if line.startswith("|")]


def test_train_multinode_script_on_one_node(data_cache, tmp_path):
    out = tmp_path / "multinode"
    env = {
        "NNODES": "1",
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "OUT": str(out),
        "ITERS": "4",
        "DATA_ARGS": f"--data-cache-dir {data_cache}",
    }
    args = [
        *TINY_MODEL,
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "1",
        "--save-interval",
        "4",
        "--wsm-interval",
        "2",
        "--wsm-window",
        "2",
        "--output-json",
        str(out / "r.json"),
    ]
    _bash("examples/train_multinode.sh", env, args)
    result = json.loads((out / "r.json").read_text())
    assert [h["iteration"] for h in result["train_history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in result["train_history"])
    assert math.isfinite(result["loss"])
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    window = sorted(p.name for p in (out / "ckpt" / "wsm_window").iterdir() if p.is_dir())
    assert window == ["iter_0000002", "iter_0000004"], window
    assert os.path.isdir(out / "tb")
