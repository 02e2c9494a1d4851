"""A full checkpoint written on a GPU (CUDA RNG tracker states) resumes training on CPU: the
device RNG streams are re-seeded from --seed with a note, instead of the first attention
forward failing on 16-byte CUDA generator states. The GPU save is emulated on CPU by saving
CUDA-shaped states (tests/gpu does it for real)."""

from __future__ import annotations

import math
import textwrap

import pytest

from tests.helpers import TINY_MODEL, losses, run_script

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two tiny trainings, ~1 min

AS_IF_ON_A_GPU = textwrap.dedent(
    """
    import sys

    if __name__ == "__main__":
        import torch

        from megatron_wsm.checkpoint import rng as rng_state

        cpu_capture = rng_state.capture

        def capture():
            state = cpu_capture()
            state["device"] = "cuda"
            tracker = state["rng_tracker_states"]
            state["rng_tracker_states"] = {k: torch.arange(16, dtype=torch.uint8) for k in tracker}
            state["cuda_rng_state"] = torch.arange(16, dtype=torch.uint8)
            return state

        rng_state.capture = capture
        from megatron_wsm.pretrain import main

        sys.exit(main())
    """
)


def test_gpu_checkpoint_resumes_training_on_cpu(data_cache, tmp_path):
    import json

    wrapper = tmp_path / "pretrain_as_if_on_a_gpu.py"
    wrapper.write_text(AS_IF_ON_A_GPU)
    common = [*TINY_MODEL, "--data-cache-dir", data_cache, "--seed", "77"]
    ckpt = tmp_path / "ckpt"
    run_script(str(wrapper), [*common, "--train-iters", "2", "--save", ckpt])
    out = tmp_path / "r.json"
    proc = run_script(
        "pretrain_moe.py",
        [*common, "--train-iters", "4", "--load", ckpt, "--output-json", out],
    )
    result = json.loads(out.read_text())
    assert [h["iteration"] for h in result["train_history"]] == [3, 4]
    assert all(math.isfinite(x) for x in losses(result))
    notes = [line for line in proc.stdout.splitlines() if "RNG tracker states were saved" in line]
    assert len(notes) == 1, proc.stdout[-3000:]
    assert "saved on CUDA; resuming on CPU" in notes[0] and "--seed 77" in notes[0]
