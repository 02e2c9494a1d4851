"""``--wsm-eval-methods``: the merged readout during training equals merging to disk and
evaluating, and does not change training; ``evaluate.py --load-dir`` equals evaluating the
written merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, losses, run_pretrain, run_script

pytestmark = pytest.mark.distributed

#: The tiny run: window saves every 2 iterations over 4 (3 checkpoints), eval every 4.
RUN = [
    *TINY_MODEL, "--train-iters", "12", "--lr", "3e-3", "--lr-decay-style", "stable",
    "--wsm-interval", "2", "--wsm-window", "4", "--eval-interval", "4",
]
#: evaluate.py defaults to the whole split with its own batch size: ask for the trainer's set.
SAME_EVAL = ["--eval-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2"]
LAYOUTS = {
    "EP2": ["--expert-model-parallel-size", "2"],
    "TP2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
}


def _evaluate(args: list, out: Path, data_cache: str, nproc: int = 1) -> dict:
    run_script(
        "tools/evaluate.py",
        [*args, *SAME_EVAL, "--data-cache-dir", data_cache, "--output-json", out],
        nproc,
    )
    return json.loads(out.read_text())


def _check_readout(layout: str, data_cache: str, tmp_path: Path) -> None:
    extra = [*LAYOUTS[layout], "--data-cache-dir", data_cache]
    tb = tmp_path / "tb"
    with_readout = run_pretrain(
        [*RUN, *extra, "--save", tmp_path / "a", "--wsm-eval-methods", "1-sqrt,mean",
         "--wsm-async", "--tensorboard-dir", tb],
        tmp_path / "a.json", nproc=2,
    )
    plain = run_pretrain(
        [*RUN, *extra, "--save", tmp_path / "b"], tmp_path / "b.json", nproc=2
    )
    # Swapping the merge in and back out leaves training bit-identical.
    assert losses(with_readout) == losses(plain)

    rows = with_readout["wsm_readouts"]
    # Iteration 4: the window (iterations 2, 4) is not full yet; 8 and 12: two methods each.
    assert [(r["iteration"], r["method"], "skipped" in r) for r in rows] == [
        (4, "1-sqrt", True), (4, "mean", True),
        (8, "1-sqrt", False), (8, "mean", False),
        (12, "1-sqrt", False), (12, "mean", False),
    ]
    readout = {r["method"]: r for r in rows if r["iteration"] == 12}
    window = tmp_path / "a" / "wsm_window"
    assert [Path(p).name for p in readout["1-sqrt"]["merge"]["inputs"]] == [
        "iter_0000008", "iter_0000010", "iter_0000012"
    ]

    # The same window merged to disk by the merge tool, evaluated by evaluate.py.
    merged = tmp_path / "merged"
    run_script("tools/merge_wsm.py", ["--load-dir", window, "--method", "1-sqrt", "--save",
                                      merged, "--no-progress-bar"])
    on_disk = _evaluate(["--load", merged], tmp_path / "m.json", data_cache)
    assert readout["1-sqrt"]["loss"] == pytest.approx(on_disk["loss"], abs=1e-5)
    for key in ("mean_global_max_violation", "mean_global_min_violation"):
        assert readout["1-sqrt"]["moe"][key] == pytest.approx(on_disk["moe"][key], abs=1e-5)
    assert readout["mean"]["loss"] != pytest.approx(readout["1-sqrt"]["loss"], abs=1e-6)

    # The TensorBoard curve carries the same numbers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    curve = {e.step: e.value for e in acc.Scalars("validation/lm loss wsm-1-sqrt")}
    assert sorted(curve) == [8, 12]
    assert curve[12] == pytest.approx(readout["1-sqrt"]["loss"], rel=1e-6)
    assert "validation/lm loss wsm-mean ppl" in acc.Tags()["scalars"]

    # evaluate.py --load-dir: the same merge, never written, in another process count.
    in_memory = _evaluate(["--load-dir", window, "--method", "1-sqrt"], tmp_path / "l.json",
                          data_cache)
    assert in_memory["loss"] == pytest.approx(on_disk["loss"], abs=1e-5)
    assert in_memory["merge"]["coefficients"] == readout["1-sqrt"]["merge"]["coefficients"]

    # A window of one checkpoint is refused with the merge tool's message, before any work.
    proc = run_script(
        "tools/evaluate.py",
        ["--load-dir", window, "--window-iters", "0", "--data-cache-dir", data_cache],
        check=False,
    )
    assert proc.returncode != 0  # the tool's 2; torchrun reports any failure as 1
    assert "a merge needs at least 2" in proc.stderr
    assert "]: Traceback" not in proc.stderr


def test_readout_equals_merge_then_evaluate_ep2(data_cache, tmp_path):
    _check_readout("EP2", data_cache, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["TP2", "PP2"])
def test_readout_equals_merge_then_evaluate(layout, data_cache, tmp_path):
    _check_readout(layout, data_cache, tmp_path)


@pytest.mark.slow
def test_readout_with_bf16_and_distributed_optimizer(data_cache, tmp_path):
    """bf16 weights, fp32 main params in megatron-core's distributed optimizer (DP=2): the
    readout swaps only the bf16 model parameters and puts them back bit-exactly."""
    common = [*RUN, "--bf16", "--use-distributed-optimizer", "--data-cache-dir", data_cache]
    with_readout = run_pretrain(
        [*common, "--save", tmp_path / "a", "--wsm-eval-methods", "mean"],
        tmp_path / "a.json", nproc=2,
    )
    plain = run_pretrain([*common, "--save", tmp_path / "b"], tmp_path / "b.json", nproc=2)
    assert losses(with_readout) == losses(plain)
    done = [r for r in with_readout["wsm_readouts"] if "loss" in r]
    assert [r["iteration"] for r in done] == [8, 12]
    merged = tmp_path / "merged"
    run_script("tools/merge_wsm.py", ["--load-dir", tmp_path / "a" / "wsm_window", "--method",
                                      "mean", "--save", merged, "--no-progress-bar"])
    on_disk = _evaluate(["--load", merged, "--bf16"], tmp_path / "m.json", data_cache)
    assert done[-1]["loss"] == pytest.approx(on_disk["loss"], abs=1e-5)
