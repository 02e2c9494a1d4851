"""The trainer on the real megatron-core engine, 2 gloo processes per layout (issue 3)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import TINY_MODEL, losses, run_pretrain, run_script

pytestmark = pytest.mark.distributed

ITERS = ["--train-iters", "4", "--lr", "3e-3", "--layout-independent-init"]

LAYOUTS = {
    "DP2": [],
    "TP2-SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
    "EP2": ["--expert-model-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def single_process(data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    tb = out / "tb"
    result = run_pretrain(
        [*TINY_MODEL, *ITERS, "--data-cache-dir", data_cache, "--tensorboard-dir", tb],
        out / "r.json",
    )
    return result, tb


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, single_process, data_cache, tmp_path):
    reference, _ = single_process
    result = run_pretrain(
        [*TINY_MODEL, *ITERS, *LAYOUTS[layout], "--data-cache-dir", data_cache],
        tmp_path / "r.json",
        nproc=2,
    )
    got, want = losses(result), losses(reference)
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    assert got[-1] < got[0], f"{layout}: loss did not decrease: {got}"
    # Same data, same (layout-independent) initial weights: same first-step loss.
    assert got[0] == pytest.approx(want[0], abs=1e-4), (layout, got, want)
    # Later steps follow within float reassociation noise.
    assert got == pytest.approx(want, abs=5e-3), (layout, got, want)
    # MoE load-balance violations, counted on every rank and reduced, do not depend on the
    # layout either (issue 7): per layer and their means.
    moe, ref = result["moe"], reference["moe"]
    assert moe["moe_layers"] == ref["moe_layers"] == [1, 2]
    for key in ("global_max_violation", "global_min_violation"):
        assert moe[key] == pytest.approx(ref[key], abs=1e-6), (layout, key)
    assert moe["expert_load"] == ref["expert_load"]


def test_tensorboard_has_loss_and_lr(single_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tb = single_process
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm"} <= tags, tags
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3, 4]
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("learning-rate"))
    moe_tags = {
        "moe/global_max_violation/layer_0",
        "moe/global_min_violation/layer_1",
        "moe/mean_global_max_violation",
        "moe/mean_global_min_violation",
        "moe/mean_batch_max_violation",
        "moe/mean_batch_min_violation",
        "load_balancing_loss",
        "throughput/tokens-per-sec",
    }
    assert moe_tags <= tags, moe_tags - tags
    assert "moe/expert_load/layer_0" in acc.Tags()["histograms"]
    assert not any(t.endswith("/layer_2") for t in tags)  # 2 layers: tags layer_0, layer_1
    for e in acc.Scalars("moe/mean_global_max_violation"):
        assert 0.0 <= e.value <= 1.0  # top-2 of 4 experts: max load <= 2x the mean


def test_resume_is_bitwise(data_cache, tmp_path):
    """8 iterations straight == 4 + save + load + 4 (losses and LRs identical)."""
    common = [
        *TINY_MODEL,
        "--train-iters",
        "8",
        "--lr-warmup-iters",
        "2",
        "--lr-decay-style",
        "WSD",
        "--lr-wsd-decay-iters",
        "4",
        "--expert-model-parallel-size",
        "2",
        "--data-cache-dir",
        data_cache,
    ]
    straight = run_pretrain(common, tmp_path / "a.json", nproc=2)
    ckpt = tmp_path / "ckpt"
    first = run_pretrain(
        [*common, "--save", ckpt, "--exit-interval", "4"], tmp_path / "b.json", nproc=2
    )
    second = run_pretrain([*common, "--save", ckpt, "--load", ckpt], tmp_path / "c.json", nproc=2)
    resumed = first["train_history"] + second["train_history"]
    assert [h["iteration"] for h in resumed] == list(range(1, 9))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight["train_history"]]
    assert [h["lr"] for h in resumed] == [h["lr"] for h in straight["train_history"]]


def test_bad_layout_is_one_clear_error(data_cache):
    proc = run_script(
        "pretrain_moe.py",
        [
            *TINY_MODEL,
            "--num-experts",
            "3",
            "--expert-model-parallel-size",
            "2",
            "--data-cache-dir",
            data_cache,
        ],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0
    assert "--num-experts 3 is not divisible by --expert-model-parallel-size 2" in proc.stderr
    # torchrun itself reports the failed child; the ranks print one line, no traceback.
    assert "]: Traceback" not in proc.stderr


def test_load_of_another_model_shape_is_refused(data_cache, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_pretrain(
        [*TINY_MODEL, "--train-iters", "1", "--save", ckpt, "--data-cache-dir", data_cache],
        tmp_path / "a.json",
    )
    proc = run_script(
        "pretrain_moe.py",
        [
            *TINY_MODEL,
            "--hidden-size",
            "64",
            "--train-iters",
            "2",
            "--load",
            ckpt,
            "--data-cache-dir",
            data_cache,
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "holds another model" in proc.stderr and "hidden_size" in proc.stderr
    assert "]: Traceback" not in proc.stderr


def test_evaluate_tool_reads_manifest_and_covers_whole_split(data_cache, tmp_path):
    """tools/evaluate.py rebuilds the model from the checkpoint's manifest (no model flags) and
    by default evaluates the whole held-out split, in full global batches."""
    ckpt = tmp_path / "ckpt"
    run_pretrain(
        [
            *TINY_MODEL,
            "--hidden-size",
            "48",
            "--train-iters",
            "1",
            "--save",
            ckpt,
            "--data-cache-dir",
            data_cache,
        ],
        tmp_path / "a.json",
    )
    out = tmp_path / "eval.json"
    run_script("tools/evaluate.py", ["--load", ckpt, "--output-json", out])
    result = json.loads(out.read_text())
    tokens_per_batch = 4 * 32
    assert result["tokens"] % tokens_per_batch == 0
    assert result["tokens"] > 2 * tokens_per_batch  # more than --eval-iters 2 of TINY_MODEL
    assert math.isfinite(result["loss"]) and result["moe"]["moe_layers"] == [1, 2]
