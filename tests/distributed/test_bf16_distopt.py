"""bf16 and megatron-core's distributed optimizer on CPU/gloo (2 processes): bitwise resume,
window checkpoints, merge and evaluation, and resuming in another layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.layout import list_checkpoints, list_window
from megatron_wsm.checkpoint.manifest import read_manifest
from megatron_wsm.coefficients import merge_coefficients
from tests.distributed.test_window import _read_model
from tests.helpers import TINY_MODEL, run_pretrain, run_script

pytestmark = pytest.mark.distributed

DISTOPT = ["--bf16", "--use-distributed-optimizer"]


def _common(data_cache: str, iters: int = 6) -> list:
    # The LR changes every phase (warmup, stable, decay): a resume that lost the scheduler or
    # the Adam step count shows in the losses.
    return [
        *TINY_MODEL,
        "--train-iters",
        str(iters),
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "2",
        "--lr-decay-style",
        "WSD",
        "--lr-wsd-decay-iters",
        "2",
        "--layout-independent-init",
        "--data-cache-dir",
        data_cache,
    ]


def _history(result: dict) -> list[tuple[int, float, float]]:
    return [(h["iteration"], h["loss"], h["lr"]) for h in result["train_history"]]


def _assert_resume_bitwise(common: list, tmp_path, nproc: int = 2) -> dict:
    """N iterations straight == 3 + full save + load + the rest (losses and LRs identical)."""
    straight = run_pretrain(
        [*common, "--save", tmp_path / "straight_ckpt"], tmp_path / "straight.json", nproc=nproc
    )
    ckpt = tmp_path / "ckpt"
    first = run_pretrain(
        [*common, "--save", ckpt, "--exit-interval", "3"], tmp_path / "first.json", nproc=nproc
    )
    second = run_pretrain(
        [*common, "--save", ckpt, "--load", ckpt], tmp_path / "second.json", nproc=nproc
    )
    assert all(math.isfinite(loss) for _, loss, _ in _history(straight))
    assert _history(first) + _history(second) == _history(straight)
    return straight


def _check_windows_merge_and_evaluate(save, tmp_path) -> None:
    """The window checkpoints of a bf16 run hold bf16 weights at <= 20 % of a full checkpoint,
    merge with fp32 accumulation (within one bf16 rounding of the exact average) and evaluate."""
    window = list_window(save / "wsm_window")
    assert [c.iteration for c in window] == [2, 4, 6]
    full = [c for c in list_checkpoints(save) if c.manifest and c.manifest.kind == "full"]
    md = ckpt_integrity.load_metadata(window[-1].path)
    dtypes = {
        key: item.properties.dtype
        for key, item in md.state_dict_metadata.items()
        if hasattr(item, "properties") and item.properties.dtype.is_floating_point
    }
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert window[-1].size_bytes() <= 0.2 * full[-1].size_bytes(), (
        window[-1].size_bytes(),
        full[-1].size_bytes(),
    )

    inputs = [c.path for c in window]
    merged = tmp_path / "merged"
    run_script(
        "tools/merge_wsm.py",
        ["--inputs", *inputs, "--method", "1-sqrt", "--save", merged, "--no-progress-bar"],
    )
    coeffs = merge_coefficients("1-sqrt", len(inputs) - 1)
    tensors = [_read_model(p) for p in inputs]
    out = _read_model(merged)
    assert out.keys() == tensors[0].keys()
    for key, value in out.items():
        assert value.dtype == torch.bfloat16, key
        # Accumulated in (at least) fp32, rounded to bf16 once: within one bf16 rounding of
        # the exact average; summing in bf16 would be off by several roundings.
        exact = sum(c * t[key].double() for c, t in zip(coeffs, tensors))
        torch.testing.assert_close(value.double(), exact.bfloat16().double(), atol=0, rtol=0)

    result = tmp_path / "eval.json"
    run_script("tools/evaluate.py", ["--load", merged, "--output-json", result])
    loss = json.loads(result.read_text())["loss"]
    assert math.isfinite(loss) and loss < math.log(512) + 0.5


def test_bf16_distributed_optimizer_resume_is_bitwise_and_changes_dp(data_cache, tmp_path):
    """DP=2, bf16, distributed optimizer (default dp_reshardable): a resume is bitwise, and the
    same checkpoint resumes on 1 process (DP=1) continuing like the uninterrupted DP=2 run."""
    common = [*_common(data_cache), *DISTOPT]
    straight = _assert_resume_bitwise(common, tmp_path)
    full = [c for c in list_checkpoints(tmp_path / "ckpt") if c.manifest]
    assert [c.iteration for c in full] == [3, 6]
    assert full[0].manifest.extra["optimizer"] == {
        "optimizer": "distributed",
        "sharding": "dp_reshardable",
        "parts": 1,
    }
    assert full[0].manifest.model_config["vocab_size"] == 512

    resumed = run_pretrain(
        [*common, "--load", full[0].path],  # iteration 3, not the newest
        tmp_path / "dp1.json",
        nproc=1,
    )
    got, want = _history(resumed), _history(straight)[3:]
    assert [i for i, _, _ in got] == [4, 5, 6]
    assert [lr for _, _, lr in got] == [lr for _, _, lr in want]
    # Another DP size sums gradients in another order (bf16 weights): close, not bitwise.
    assert [x for _, x, _ in got] == pytest.approx([x for _, x, _ in want], abs=2e-3)


def test_bf16_distributed_optimizer_ep2_windows_merge_and_evaluate(data_cache, tmp_path):
    """bf16 + distributed optimizer with EP=2 (fully_reshardable, two chained optimizers):
    bitwise resume; its window checkpoints hold bf16 weights, merge and evaluate."""
    common = [
        *_common(data_cache),
        *DISTOPT,
        "--dist-ckpt-optim-fully-reshardable",
        "--expert-model-parallel-size",
        "2",
        "--wsm-interval",
        "2",
    ]
    _assert_resume_bitwise(common, tmp_path)
    manifest = read_manifest(tmp_path / "ckpt" / "iter_0000003")
    assert manifest.extra["optimizer"]["sharding"] == "fully_reshardable"
    assert manifest.extra["optimizer"]["parts"] == 2  # dense + experts
    _check_windows_merge_and_evaluate(tmp_path / "ckpt", tmp_path)


def test_bf16_plain_optimizer_resume_is_bitwise(data_cache, tmp_path):
    """bf16 with the plain optimizer (DP=2): full + window saves, bitwise resume."""
    _assert_resume_bitwise([*_common(data_cache), "--bf16", "--wsm-interval", "2"], tmp_path)
    full = [c for c in list_checkpoints(tmp_path / "ckpt") if c.manifest]
    assert [c.iteration for c in full] == [3, 6]
    assert full[-1].manifest.extra["optimizer"]["optimizer"] == "plain"
    assert [c.iteration for c in list_window(tmp_path / "ckpt" / "wsm_window")] == [2, 4, 6]


@pytest.mark.slow
def test_bf16_plain_optimizer_ep2_windows_merge_and_evaluate(data_cache, tmp_path):
    common = [
        *_common(data_cache),
        "--bf16",
        "--expert-model-parallel-size",
        "2",
        "--wsm-interval",
        "2",
    ]
    _assert_resume_bitwise(common, tmp_path)
    _check_windows_merge_and_evaluate(tmp_path / "ckpt", tmp_path)


@pytest.mark.slow
def test_model_parallel_change_is_refused_by_name(data_cache, tmp_path):
    """dp_reshardable state cannot follow an EP change; fully_reshardable state saved with EP=2
    chains two optimizers, which EP=1 cannot load: both refused with what to do."""
    common = [*_common(data_cache), *DISTOPT]
    ckpt = tmp_path / "dp"
    run_pretrain([*common, "--save", ckpt, "--exit-interval", "3"], tmp_path / "a.json", nproc=2)
    proc = run_script(
        "pretrain_moe.py",
        [*common, "--expert-model-parallel-size", "2", "--load", ckpt],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "dp_reshardable" in out and "EP 1 -> 2" in out, out[-2000:]

    ep2 = tmp_path / "ep2"
    run_pretrain(
        [*common, "--dist-ckpt-optim-fully-reshardable", "--expert-model-parallel-size", "2",
         "--save", ep2, "--exit-interval", "3"],
        tmp_path / "b.json",
        nproc=2,
    )
    proc = run_script("pretrain_moe.py", [*common, "--load", ep2], nproc=1, check=False)
    assert proc.returncode != 0
    assert "2 chained optimizer(s) and this layout has 1" in proc.stdout + proc.stderr
    assert "--no-load-optim" in proc.stdout + proc.stderr
