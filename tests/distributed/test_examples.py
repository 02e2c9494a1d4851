"""The example scripts run as a user runs them: bash, torchrun, the tools (issue 9).

Shortened settings (a few iterations of a smaller model) so they fit in CI; the numbers are not
checked for quality, only that every stage ran, produced finite results and its outputs. The
scripts run from a shell without ``.venv/bin`` on ``PATH`` (they find it: issue 29); the launch
scripts (train_multinode.sh, train.slurm) are tested in test_launch_scripts.py.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess

import pytest

from tests.distributed.newcomer import newcomer_env
from tests.helpers import ROOT

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
        env=newcomer_env(env),  # a fresh shell: the script finds .venv itself (issue 29)
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _short_env(out, data_cache) -> dict[str, str]:
    """The example's environment for a shortened run into ``out``."""
    return {
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
        "EVAL_INTERVAL": "10",  # held-out points (and the stable run's readout) at 10 and 20
    }


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_cache):
    """One shortened run of the example: (its OUT, its env, its stdout)."""
    out = tmp_path_factory.mktemp("examples") / "wsm_vs_wsd"
    env = _short_env(out, data_cache)
    return out, env, _bash("examples/wsm_vs_wsd.sh", env).stdout


def test_wsm_vs_wsd_short(short_run):
    out, env, stdout = short_run

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
    # The held-out curve points and the stable run's own 1-sqrt readout of its window.
    assert [h["iteration"] for h in wsd["train_history"] if "valid_loss" in h] == [10, 20]
    readouts = [r for r in stable["wsm_readouts"] if "loss" in r]
    assert [r["iteration"] for r in readouts] == [10, 20]
    assert readouts[-1]["merge"]["coefficients"] == pytest.approx(
        [i["coefficient"] for i in merge["inputs"]])

    # Resumable: a second run skips every stage and prints the same table.
    again = _bash("examples/wsm_vs_wsd.sh", env).stdout
    assert "== train" not in again and "== merge merged" not in again, again
    assert "== evaluate" not in again, again
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table == [line for line in again.splitlines() if line.startswith("|")]


# ids: a test id "gpu" would carry the `gpu` keyword, which skips the test on CPU machines.
@pytest.mark.parametrize("preset", ["tiny", "cpu-medium", "gpu"],
                         ids=["tiny", "cpu-medium", "gpu-preset"])
def test_wsm_vs_wsd_presets_give_valid_runs(preset, tmp_path):
    """Each preset's two training commands (DRY_RUN=1 prints them) are valid trainer
    configurations at its process count: flags exist, the evaluation interval is a multiple of
    the window interval, the batch divides, equal tokens in both runs."""
    from megatron_wsm.arguments import parse_run_config

    stdout = _bash("examples/wsm_vs_wsd.sh",
                   {"PRESET": preset, "DRY_RUN": "1", "OUT": str(tmp_path)}).stdout
    lines = [line for line in stdout.splitlines() if line.startswith("train ")]
    # cpu-medium and gpu save full checkpoints at the decay start: WSD branches off the stable
    # run there (trained after it, loading its checkpoint); tiny trains both from scratch.
    order = ["train wsd", "train stable"] if preset == "tiny" else ["train stable", "train wsd"]
    assert [line.split(":")[0] for line in lines] == order, stdout
    if preset != "tiny":
        decay_start = 1000 * 8 // 10 if preset == "cpu-medium" else 900 * 8 // 10
        assert lines[1].endswith(f"--load {tmp_path}/stable/ckpt/iter_{decay_start:07d}")
    tokens = set()
    for line in lines:
        argv = shlex.split(line.split(": ", 1)[1])
        assert argv[0] == "pretrain_moe.py"
        cfg, _ = parse_run_config(argv[1:])
        world = 1 if preset == "gpu" else 2
        cfg.validate(world_size=world, cuda=False)
        tokens.add(cfg.training.train_iters * cfg.training.global_batch_size
                   * cfg.model.seq_length)
        if preset != "tiny":
            assert cfg.data.data_source == "env-python" and cfg.data.vocab_size == 16384
    assert len(tokens) == 1
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize(("preset", "iters", "window", "grid"), [
    ("tiny", 800, 160, [(10, 16), (20, 8), (40, 4), (80, 2)]),
    ("cpu-medium", 1000, 200, [(10, 20), (20, 10), (40, 5), (100, 2)]),
])
def test_wsm_vs_wsd_merges_end_at_the_newest_checkpoint(preset, iters, window, grid, tmp_path):
    """DRY_RUN=1 also prints the merges: every granularity-grid merge spans exactly the merge
    duration and ends at the last iteration (evenly spaced inputs), and the remedy merges
    (KEEP_ITERS, MIN_LR_RATIOS) are asked for."""
    stdout = _bash("examples/wsm_vs_wsd.sh",
                   {"PRESET": preset, "DRY_RUN": "1", "GRID": "1", "OUT": str(tmp_path),
                    "KEEP_ITERS": str(2 * window), "MIN_LR_RATIOS": "0.1"}).stdout
    merges = dict(line[len("merge "):].split(": ", 1) for line in stdout.splitlines()
                  if line.startswith("merge "))
    got = []
    for name, args in merges.items():
        if not name.startswith("grid_"):
            continue
        its = [int(p.rsplit("_", 1)[1]) for p in shlex.split(args) if "iter_" in p]
        steps = {b - a for a, b in zip(its, its[1:])}
        assert its[0] == iters - window and its[-1] == iters and len(steps) == 1, (name, its)
        got.append((steps.pop(), len(its) - 1))
    assert got == grid
    assert f"--window-iters {2 * window} --method 1-sqrt" in merges[f"merged_1sqrt_w{2 * window}"]
    assert merges["merged_1sqrt_r0.1"].endswith("--method 1-sqrt --min-lr-ratio 0.1")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # ~110 s: the fast checks are the dry-run wiring above + test_env_python
def test_cpu_medium_preset_trains(data_cache, tmp_path):
    """The cpu-medium preset's own model and data source for a few iterations (a 3 MB slice of
    the env-python corpus instead of all of it), through the example's whole pipeline."""
    out = tmp_path / "medium"
    env = {"PRESET": "cpu-medium", "OUT": str(out), "ITERS": "6", "WSM_INTERVAL": "2",
           "DECAY_ITERS": "4", "EVAL_INTERVAL": "6",
           "EVAL_ITERS": "1", "LOG_INTERVAL": "1", "MERGE_NPROC": "1",
           "DATA_CACHE": str(tmp_path / "cache"),
           "DATA_ARGS": "--data-source env-python --data-max-bytes 3000000 --vocab-size 1024"}
    stdout = _bash("examples/wsm_vs_wsd.sh", env, timeout=600).stdout
    assert "WSM merge 1-sqrt" in stdout
    stable = json.loads((out / "stable" / "result.json").read_text())
    assert stable["iteration"] == 6 and math.isfinite(stable["loss"])
    manifest = json.loads((out / "stable" / "ckpt" / "iter_0000006" / "wsm_manifest.json")
                          .read_text())
    run = manifest["extra"]["run"]
    assert run["model"]["num_experts"] == 8 and run["data"]["data_source"] == "env-python"


@pytest.mark.slow
def test_wsm_vs_wsd_export_scores_every_checkpoint(short_run, tmp_path):
    """EXPORT=1 on a finished OUT: no retraining, each checkpoint exported and scored by lm-eval,
    the scores as extra columns of its own row."""
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    src, env, _ = short_run
    out = tmp_path / "wsm_vs_wsd"
    shutil.copytree(src, out)  # the fast test's OUT stays as it was
    env = {**env, "OUT": str(out), "EXPORT": "1", "HARNESS_LIMIT": "6"}
    stdout = _bash("examples/wsm_vs_wsd.sh", env, timeout=900).stdout
    assert "== train" not in stdout and "== evaluate" not in stdout, stdout

    header = next(line for line in stdout.splitlines() if line.startswith("| checkpoint"))
    assert header.endswith("| lm-eval bits/byte | lm-eval word ppl | cloze acc | cloze acc_norm |")
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in TABLE_ROWS:
            rows[cells[0]] = [float(x) for x in cells[1:]]
    assert sorted(rows) == sorted(TABLE_ROWS), stdout
    for label, (loss, _, _, _, bpb, word_ppl, acc, acc_norm) in rows.items():
        assert math.isfinite(loss) and 0 < bpb < 20 and word_ppl > 1, (label, rows[label])
        assert 0 <= acc <= 1 and 0 <= acc_norm <= 1, (label, acc, acc_norm)
    # Each row scores its own model: the last iterates of the two runs differ.
    assert rows["WSD (1-sqrt decay)"][4] != rows["WSM stable (last iterate)"][4]
    assert "cloze acc" in (out / "table.md").read_text()

    names = ["stable", "wsd", "merged_1sqrt", "merged_mean", "merged_ema"]
    for name in names:
        prov = json.loads((out / "hf" / name / "wsm_export.json").read_text())
        assert prov["iteration"] == 20, (name, prov)
    assert json.loads((out / "hf" / "merged_ema" / "wsm_export.json").read_text())["kind"] \
        == "merged"
    assert sorted(p.stem for p in (out / "harness").glob("*.json")) == sorted(names)

    # Resumable: a second EXPORT=1 run exports and scores nothing again.
    again = _bash("examples/wsm_vs_wsd.sh", env).stdout
    assert "== export" not in again, again

