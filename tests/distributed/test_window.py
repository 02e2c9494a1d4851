"""Window checkpoints from the real trainer (issue 5): iterations, retention, loadability,
crash safety and async equality."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_wsm.checkpoint.layout import list_checkpoints, list_window
from megatron_wsm.checkpoint.manager import CRASH_ENV
from megatron_wsm.checkpoint.manifest import read_manifest
from megatron_wsm.coefficients import merge_coefficients
from megatron_wsm.testing.launch import run_until_exit, start_script
from tests.helpers import TINY_MODEL, _env, losses, run_pretrain, run_script

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "TP2-SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
    "EP2": ["--expert-model-parallel-size", "2"],
}


def _read_model(ckpt) -> dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint, with plain torch (no megatron)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(
        sd,
        storage_reader=FileSystemReader(str(ckpt)),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_window_saves_retention_and_reload(layout, data_cache, tmp_path):
    save = tmp_path / "ckpt"
    result = run_pretrain(
        [
            *TINY_MODEL,
            *LAYOUTS[layout],
            "--train-iters",
            "12",
            "--save",
            save,
            "--wsm-interval",
            "2",
            "--wsm-window",
            "4",
            "--layout-independent-init",
            "--data-cache-dir",
            data_cache,
        ],
        tmp_path / "train.json",
        nproc=2,
    )
    window = list_window(save / "wsm_window")
    assert [c.iteration for c in window] == [8, 10, 12]  # k + 1 = 3 checkpoints of the window
    m = window[-1].manifest
    assert m.kind == "window" and m.complete
    assert m.consumed_tokens == 12 * 4 * 32
    assert m.parallel.world_size == 2
    full = [c for c in list_checkpoints(save) if c.manifest and c.manifest.kind == "full"]
    assert [c.iteration for c in full] == [12]
    # Model only: a small fraction of the full checkpoint (no optimizer state).
    assert window[-1].size_bytes() < 0.5 * full[-1].size_bytes()
    keys = set(_read_model(window[-1].path))
    assert not any(k.startswith("optimizer") for k in keys)
    # The newest window checkpoint is the final model: loading it (into ONE process, i.e.
    # resharded) gives the training run's own final validation loss.
    reloaded = run_pretrain(
        [*TINY_MODEL, "--eval-only", "--load", window[-1].path, "--data-cache-dir", data_cache],
        tmp_path / "eval.json",
    )
    assert reloaded["loss"] == pytest.approx(result["loss"], abs=2e-4)

    # Issue 6: merging this window, in the layout it was saved in, with 1 and 2 merge ranks,
    # equals the float64 weighted average of every input tensor (fp32 output tolerance).
    inputs = [c.path for c in window]
    coeffs = merge_coefficients("1-sqrt", len(inputs) - 1)
    tensors = [_read_model(p) for p in inputs]
    for nproc in (1, 2):
        out = tmp_path / f"merged_{nproc}"
        run_script(
            "tools/merge_wsm.py",
            ["--inputs", *inputs, "--method", "1-sqrt", "--save", out, "--no-progress-bar"],
            nproc=nproc,
        )
        merged = _read_model(out)
        assert merged.keys() == tensors[0].keys()
        for key, value in merged.items():
            ref = sum(c * t[key].double() for c, t in zip(coeffs, tensors))
            assert value.dtype == tensors[0][key].dtype
            torch.testing.assert_close(value.double(), ref, atol=1e-6, rtol=1e-6)
        assert read_manifest(out).kind == "merged"


def test_merged_checkpoint_evaluates_like_naive_average(data_cache, tmp_path):
    """The merge output loads in the trainer (1 process and the saved EP=2 layout) and gives
    the eval loss of a naive reference: every checkpoint loaded whole, averaged in memory."""
    save = tmp_path / "ckpt"
    args = [*TINY_MODEL, "--data-cache-dir", data_cache]
    run_pretrain(
        [
            *args,
            "--train-iters",
            "6",
            "--save",
            save,
            "--wsm-interval",
            "2",
            "--expert-model-parallel-size",
            "2",
        ],
        tmp_path / "train.json",
        nproc=2,
    )
    inputs = [str(c.path) for c in list_window(save / "wsm_window")]
    merged = tmp_path / "merged"
    run_script(
        "tools/merge_wsm.py",
        ["--inputs", *inputs, "--method", "mean", "--save", merged, "--no-progress-bar"],
    )
    coeffs = merge_coefficients("mean", len(inputs) - 1)
    naive = run_script(
        "tests/naive_merge_eval.py",
        [*args, "--coefficients", ",".join(map(str, coeffs)), "--inputs", *inputs],
    )
    reference = json.loads(naive.stdout.strip().splitlines()[-1])
    one = run_pretrain([*args, "--eval-only", "--load", merged], tmp_path / "e1.json")
    two = run_pretrain(
        [*args, "--eval-only", "--load", merged, "--expert-model-parallel-size", "2"],
        tmp_path / "e2.json",
        nproc=2,
    )
    assert one["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert two["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_kill_during_window_save_then_resume(data_cache, tmp_path):
    common = [
        *TINY_MODEL,
        "--train-iters",
        "8",
        "--save-interval",
        "4",
        "--wsm-interval",
        "2",
        "--wsm-window",
        "4",
        "--expert-model-parallel-size",
        "2",
        "--data-cache-dir",
        data_cache,
    ]
    straight = run_pretrain([*common, "--save", tmp_path / "a"], tmp_path / "a.json", nproc=2)

    save = tmp_path / "b"
    env = _env()
    env[CRASH_ENV] = "window:6:after-shards"  # rank 0 SIGKILLs itself mid-save at iteration 6
    returncode = run_until_exit(
        start_script("pretrain_moe.py", [*common, "--save", save], tmp_path / "crash.log", 2, env)
    )
    assert returncode != 0
    listed = {c.iteration: c for c in list_checkpoints(save / "wsm_window")}
    assert listed[6].complete is False and listed[6].path.name.startswith(".tmp-")
    assert [c.iteration for c in list_window(save / "wsm_window")] == [2, 4]
    assert read_manifest(save / "iter_0000004").complete

    resumed = run_pretrain([*common, "--save", save, "--load", save], tmp_path / "b.json", nproc=2)
    assert [h["iteration"] for h in resumed["train_history"]] == [5, 6, 7, 8]
    assert losses(resumed) == losses(straight)[4:]  # bitwise on CPU
    assert [c.iteration for c in list_window(save / "wsm_window")] == [4, 6, 8]
    assert not any(c.path.name.startswith(".tmp-") for c in list_checkpoints(save / "wsm_window"))


def test_async_window_checkpoint_equals_sync(data_cache, tmp_path):
    common = [
        *TINY_MODEL,
        "--train-iters",
        "6",
        "--wsm-interval",
        "3",
        "--data-cache-dir",
        data_cache,
    ]
    run_pretrain([*common, "--save", tmp_path / "sync"], tmp_path / "s.json")
    run_pretrain(
        [*common, "--save", tmp_path / "async", "--wsm-async", "--async-save"], tmp_path / "a.json"
    )
    for it in (3, 6):
        name = f"iter_{it:07d}"
        a = _read_model(tmp_path / "sync" / "wsm_window" / name)
        b = _read_model(tmp_path / "async" / "wsm_window" / name)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    manifest = json.loads((tmp_path / "async" / "iter_0000006" / "wsm_manifest.json").read_text())
    assert manifest["complete"] and manifest["iteration"] == 6
    assert os.path.exists(tmp_path / "async" / "latest_checkpointed_iteration.txt")
