"""The step's loss and its non-finite verdict come out of one all-reduce: a non-finite gradient
on ONE rank stops the step on EVERY rank (naming the parameter), and the loss is the
token-weighted mean over all ranks' micro-batches. Two gloo processes, no model: the
per-rank gradient verdict is injected."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2
# rank -> its micro-batches' [loss sum, tokens]: mean over both ranks = (6 + 2 + 12) / (4 + 1 + 5)
REPORTS = {0: [(6.0, 4.0), (2.0, 1.0)], 1: [(12.0, 5.0)]}
BAD_PARAM = "decoder.layers.1.mlp.experts.linear_fc1.weight"


def _comp() -> types.SimpleNamespace:
    from megatron_wsm.config import RunConfig

    return types.SimpleNamespace(
        cfg=RunConfig(), model=[], state=types.SimpleNamespace(iteration=6)
    )


def _case(rank: int, bad_rank: int | None) -> dict:
    from megatron_wsm import metric_names as names
    from megatron_wsm import training

    # This rank's gradient verdict, as nonfinite_gradients would give it.
    names_here = [BAD_PARAM] if rank == bad_rank else []
    training.nonfinite_gradients = lambda model, nan_only=False: list(names_here)
    reports = [{names.LM_LOSS: torch.tensor(r, dtype=torch.float32)} for r in REPORTS[rank]]
    loss, any_bad = training._reduce_loss(reports, nonfinite_here=bool(names_here))
    out: dict = {"loss": loss, "any": any_bad, "raised": None}
    try:
        training.check_step_finite(_comp(), loss, any_bad)
    except training.NonFiniteStepError as e:
        out["raised"] = str(e)
    return out


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    results = {}
    try:
        for bad_rank in (None, 0, 1):
            results[str(bad_rank)] = _case(rank, bad_rank)
    except Exception:  # noqa: BLE001 - reported to the test
        results["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("step_verdict")
    ctx = mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-process verdict cases did not finish in 300 s")
    out = []
    for rank in range(WORLD):
        with open(tmp / f"rank{rank}.json") as f:
            out.append(json.load(f))
    assert all("error" not in r for r in out), out
    return out


def test_loss_is_token_weighted_over_all_ranks_and_a_finite_step_goes_on(results):
    for per_rank in results:
        case = per_rank["None"]
        assert case["loss"] == pytest.approx(20.0 / 10.0, rel=1e-12)
        assert case["any"] is False and case["raised"] is None


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_one_ranks_non_finite_gradient_stops_every_rank(results, bad_rank):
    for per_rank in results:
        case = per_rank[str(bad_rank)]
        assert case["any"] is True
        assert case["raised"] is not None, "a rank went on to the optimizer step"
        assert BAD_PARAM in case["raised"] and "iteration 7" in case["raised"]
        assert case["loss"] == pytest.approx(2.0, rel=1e-12)  # the loss itself was finite
