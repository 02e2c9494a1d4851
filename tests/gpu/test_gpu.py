"""CUDA code paths (skipped without CUDA; run on a GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import TINY_MODEL, losses, run_pretrain, run_script

pytestmark = pytest.mark.gpu


def test_cpu_shims_stay_off_with_cuda():
    from megatron_wsm import cpu_compat

    assert cpu_compat.apply() is False
    # megatron-core's jit_fuser stays torch.compile: the eager import shim is CPU-only.
    import torch
    from megatron.core import jit

    assert jit.jit_fuser is torch.compile


def test_layer_spec_uses_transformer_engine_when_installed():
    pytest.importorskip("transformer_engine")
    from megatron_wsm.config import ModelConfig, ParallelConfig
    from megatron_wsm.model import build_layer_spec, build_transformer_config

    model = ModelConfig()
    spec = build_layer_spec(build_transformer_config(model, ParallelConfig()), model)
    names = repr(spec)
    assert "TE" in names, names


def test_trains_on_cuda_with_nccl(data_cache, tmp_path):
    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", "4", "--data-cache-dir", data_cache], tmp_path / "r.json"
    )
    got = losses(result)
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    assert got[-1] < got[0]


def test_bf16_training_on_cuda(data_cache, tmp_path):
    result = run_pretrain(
        [*TINY_MODEL, "--train-iters", "4", "--bf16", "--data-cache-dir", data_cache],
        tmp_path / "r.json",
    )
    assert all(math.isfinite(x) for x in losses(result))


# ----------------------------------------------------------------------------- production path
# bf16 + distributed optimizer + TE spec + grouped GEMM, and checkpoints crossing CPU <-> GPU.
# Not yet run on a GPU machine (written on a CPU-only one); see README "In an NGC PyTorch
# container".


def _gpu_common(data_cache: str, iters: int) -> list[str]:
    return [*TINY_MODEL, "--data-cache-dir", data_cache, "--train-iters", str(iters)]


def test_bf16_distributed_optimizer_resume_is_bit_exact(data_cache, tmp_path):
    common = [*_gpu_common(data_cache, 8), "--bf16", "--use-distributed-optimizer"]
    straight = run_pretrain(
        [*common, "--save", tmp_path / "a", "--save-interval", "4"], tmp_path / "a.json"
    )
    resumed = run_pretrain(
        [*common, "--load", tmp_path / "a" / "iter_0000004", "--save", tmp_path / "b"],
        tmp_path / "b.json",
    )
    assert [h["iteration"] for h in resumed["train_history"]] == [5, 6, 7, 8]
    # NCCL reductions and TE kernels are deterministic for a fixed layout on one GPU.
    assert losses(resumed) == losses(straight)[4:]


def test_async_window_save_holds_bf16_weights(data_cache, tmp_path):
    import torch

    from megatron_wsm.checkpoint.layout import list_checkpoints

    run_pretrain(
        [
            *_gpu_common(data_cache, 6),
            "--bf16",
            "--use-distributed-optimizer",
            "--save",
            tmp_path / "s",
            "--wsm-interval",
            "2",
            "--wsm-async",
        ],
        tmp_path / "r.json",
    )
    window = [c for c in list_checkpoints(tmp_path / "s" / "wsm_window") if c.complete]
    assert [c.iteration for c in window] == [2, 4, 6]
    from megatron_wsm.checkpoint import integrity as ckpt_integrity

    md = ckpt_integrity.load_metadata(window[-1].path)
    dtypes = {
        v.properties.dtype
        for k, v in md.state_dict_metadata.items()
        if k.endswith("weight") and hasattr(v, "properties")
    }
    assert dtypes == {torch.bfloat16}, dtypes


def _on(cpu: bool, monkeypatch) -> None:
    if cpu:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _eval_loss(args: list[str], out, cpu: bool, monkeypatch) -> float:
    _on(cpu, monkeypatch)
    return run_pretrain([*args, "--eval-only"], out)["loss"]


def _continue(args: list[str], out, cpu: bool, monkeypatch) -> tuple[dict, str]:
    """Resume training (RNG states loaded) on CPU or GPU; the result and the console."""
    _on(cpu, monkeypatch)
    proc = run_script("pretrain_moe.py", [*args, "--output-json", out])
    return json.loads(out.read_text()), proc.stdout


RESEEDED = "note: the checkpoint's RNG tracker states were saved on"


def test_checkpoint_crosses_from_cpu_to_gpu_and_back(data_cache, tmp_path, monkeypatch):
    common = _gpu_common(data_cache, 2)
    _on(True, monkeypatch)
    run_pretrain([*common, "--save", tmp_path / "cpu"], tmp_path / "c.json")  # local spec
    on_gpu = _eval_loss(
        [*common, "--load", tmp_path / "cpu"], tmp_path / "g.json", False, monkeypatch
    )
    on_cpu = _eval_loss(
        [*common, "--load", tmp_path / "cpu"], tmp_path / "h.json", True, monkeypatch
    )
    assert math.isclose(on_gpu, on_cpu, rel_tol=1e-3), (on_gpu, on_cpu)
    # Full checkpoints hold the device's RNG tracker states (CPU generator states on CPU, CUDA
    # Philox states on a GPU): training resumed on the other kind re-seeds them (one note)
    # instead of failing at the first tracker fork.
    four = _gpu_common(data_cache, 4)
    cont, console = _continue(
        [*four, "--load", tmp_path / "cpu"], tmp_path / "v.json", False, monkeypatch
    )
    assert [h["iteration"] for h in cont["train_history"]] == [3, 4]
    assert f"{RESEEDED} CPU; resuming on CUDA" in console, console[-2000:]
    # ... and a GPU (TE spec) checkpoint continues on CPU (local spec)
    _on(False, monkeypatch)
    run_pretrain([*common, "--save", tmp_path / "gpu"], tmp_path / "t.json")
    cont, console = _continue(
        [*four, "--load", tmp_path / "gpu"], tmp_path / "u.json", True, monkeypatch
    )
    assert [h["iteration"] for h in cont["train_history"]] == [3, 4]
    assert f"{RESEEDED} CUDA; resuming on CPU" in console, console[-2000:]
    # same kind: restored, no note
    _, console = _continue(
        [*four, "--load", tmp_path / "gpu"], tmp_path / "w.json", False, monkeypatch
    )
    assert RESEEDED not in console


def test_grouped_gemm_equals_sequential_experts(data_cache, tmp_path, monkeypatch):
    pytest.importorskip("transformer_engine")
    common = _gpu_common(data_cache, 2)
    run_pretrain([*common, "--save", tmp_path / "s"], tmp_path / "s.json")
    load = [*common, "--load", tmp_path / "s"]
    sequential = _eval_loss(load, tmp_path / "a.json", False, monkeypatch)
    grouped = _eval_loss([*load, "--moe-grouped-gemm"], tmp_path / "b.json", False, monkeypatch)
    assert math.isclose(sequential, grouped, rel_tol=1e-4), (sequential, grouped)


def test_merged_readout_leaves_bf16_training_unchanged(data_cache, tmp_path):
    """--wsm-eval-methods with bf16 weights and the distributed optimizer on CUDA: the merge is
    swapped in and out of the bf16 parameters (fp32 main params untouched), so losses match a
    run without readouts."""
    common = [
        *_gpu_common(data_cache, 8),
        "--bf16",
        "--use-distributed-optimizer",
        "--wsm-interval",
        "2",
        "--wsm-window",
        "4",
        "--eval-interval",
        "4",
    ]
    with_readout = run_pretrain(
        [*common, "--save", tmp_path / "a", "--wsm-eval-methods", "1-sqrt,ema"],
        tmp_path / "a.json",
    )
    plain = run_pretrain([*common, "--save", tmp_path / "b"], tmp_path / "b.json")
    assert losses(with_readout) == losses(plain)
    done = [r for r in with_readout["wsm_readouts"] if "loss" in r]
    assert [(r["iteration"], r["method"]) for r in done] == [(8, "1-sqrt"), (8, "ema")]
    assert all(math.isfinite(r["loss"]) for r in done)
