"""RNG states carry their device kind: a checkpoint saved on a GPU (CUDA-shaped tracker states)
resumes on CPU, and the reverse, by re-seeding the device streams instead of handing one
device's generator states to the other's generator."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_wsm.checkpoint import rng
from tests.helpers import ROOT, _env

CPU_STATE = torch.Generator().manual_seed(3).get_state()
CUDA_STATE = torch.arange(16, dtype=torch.uint8)  # the shape of a CUDA Philox state
NAMES = ("data-parallel-rng", "model-parallel-rng", "expert-parallel-rng")


def test_generator_state_kind_by_size():
    assert CPU_STATE.numel() == rng.CPU_STATE_BYTES
    assert rng.generator_state_kind(CPU_STATE) == rng.CPU
    assert rng.generator_state_kind(CUDA_STATE) == rng.CUDA
    assert rng.generator_state_kind(torch.Generator()) == rng.CPU
    assert rng.generator_state_kind(torch.zeros(17, dtype=torch.uint8)) is None
    assert rng.generator_state_kind(torch.zeros(16, dtype=torch.float32)) is None
    assert rng.generator_state_kind(None) is None


@pytest.mark.parametrize(
    "state, kind",
    [
        # recorded kind wins over what the states look like
        ({"device": "cuda", "tracker": {n: CPU_STATE for n in NAMES}}, "cuda"),
        ({"device": "cpu", "tracker": {n: CUDA_STATE for n in NAMES}}, "cpu"),
        # older checkpoints: inferred from the tracker states' sizes
        ({"tracker": {n: CPU_STATE for n in NAMES}}, "cpu"),
        ({"tracker": {n: CUDA_STATE for n in NAMES}, "cuda": CUDA_STATE}, "cuda"),
        ({"tracker": {n: CUDA_STATE for n in NAMES}}, "cuda"),
        ({"tracker": {}, "cuda": CUDA_STATE}, "cuda"),
        # nothing tells, or the states disagree: unknown
        ({"tracker": {}}, None),
        ({"tracker": {"a": CPU_STATE, "b": CUDA_STATE}}, None),
        ({"tracker": {"a": torch.zeros(3, dtype=torch.uint8)}}, None),
        ({"device": "tpu", "tracker": {}}, None),
    ],
)
def test_saved_kind(state, kind):
    assert rng.saved_kind(state) == kind


def test_saved_kind_of_megatron_lm_names():
    # Megatron-LM's dict (no device entry): by the tracker states, else its CUDA state.
    assert rng.saved_kind({"rng_tracker_states": {n: CPU_STATE for n in NAMES}}) == "cpu"
    assert rng.saved_kind({"rng_tracker_states": {}, "cuda_rng_state": CUDA_STATE}) == "cuda"


def test_normalize_reads_megatron_lm_and_our_older_layouts():
    mlm = {
        "random_rng_state": 1,
        "np_rng_state": 2,
        "torch_rng_state": 3,
        "cuda_rng_state": 4,
        "rng_tracker_states": {"a": 5},
    }
    assert rng.normalize([mlm]) == mlm  # Megatron-LM's one-element list
    assert rng.normalize(mlm) == mlm
    per_dp = [mlm, {**mlm, "random_rng_state": 9}]  # --data-parallel-random-init
    assert rng.normalize(per_dp, dp_rank=1)["random_rng_state"] == 9
    old = {"device": "cpu", "random": 1, "numpy": 2, "torch": 3, "tracker": {"a": 5}}
    assert rng.normalize(old) == {
        "device": "cpu",
        "random_rng_state": 1,
        "np_rng_state": 2,
        "torch_rng_state": 3,
        "rng_tracker_states": {"a": 5},
    }
    for bad in ([], "x", {"random": 1}):
        with pytest.raises(ValueError):
            rng.normalize(bad)


def test_sharding_is_megatron_lms():
    # (PP, TP) replicated over DP (DP rank 0 writes) ...
    assert rng.sharding((0, 1), (1, 2), (3, 4), ep_size=1) == ((1, 2), (0, 1), 3)
    # ... or (PP, TP, DP) with expert parallelism: one state per rank of the model replica.
    assert rng.sharding((1, 2), (0, 1), (1, 2), ep_size=2) == ((2, 1, 2), (1, 0, 1), 0)
    # The stored names the fixtures written by Megatron-LM hold (tests/data/megatron_lm).
    assert rng.shard_key((1, 1, 2), (0, 0, 1)) == "rng_state/shard_0.0.1_1.1.2"


def test_capture_uses_megatron_lm_names_and_a_cuda_placeholder_on_cpu():
    state = rng.capture()
    assert {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state"} <= set(state)
    assert "rng_tracker_states" in state and state["device"] == rng.here()
    if rng.here() == rng.CPU:
        assert torch.equal(state["cuda_rng_state"], torch.zeros(16, dtype=torch.uint8))


def test_device_states_restored_only_on_the_same_kind():
    assert rng.restores_device_states("cpu", "cpu")
    assert rng.restores_device_states("cuda", "cuda")
    assert not rng.restores_device_states("cuda", "cpu")
    assert not rng.restores_device_states("cpu", "cuda")
    assert not rng.restores_device_states(None, "cpu")
    assert not rng.restores_device_states(None, "cuda")


def test_reseed_note_names_both_devices_and_the_seed():
    note = rng.reseed_note("cuda", "cpu", 99)
    assert "saved on CUDA" in note and "resuming on CPU" in note and "--seed 99" in note
    assert "unknown device" in rng.reseed_note(None, "cuda", 1)


# A 1-process gloo world with cpu_compat's CPU RNG tracker, as the trainer runs on CPU. In a
# subprocess: cpu_compat patches torch and megatron-core process-wide.
_SCRIPT = textwrap.dedent(
    """
    import copy, json, random, sys, tempfile, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch, torch.distributed as dist
    from megatron_wsm import cpu_compat
    cpu_compat.apply()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + tempfile.mktemp())
    from megatron.core import parallel_state as ps, tensor_parallel
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    from megatron_wsm.checkpoint.manager import rng_state, set_rng_state

    tracker = tensor_parallel.get_cuda_rng_tracker  # the shim's seeding replaces the tracker
    names = sorted(tracker().get_states())

    def draw():
        out = []
        for name in names:
            with tracker().fork(name):
                out.append(torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())
        return out

    def states():
        return {k: v.clone() for k, v in tracker().get_states().items()}

    res = {"names": names}
    draw()
    saved = rng_state()
    res["kind"] = saved["device"]
    res["sizes"] = sorted({v.numel() for v in saved["rng_tracker_states"].values()})
    expected = draw()
    draw()
    res["same_kind_restored"] = set_rng_state(copy.deepcopy(saved), seed=7)
    res["same_kind_continues"] = draw() == expected

    # A GPU checkpoint: CUDA Philox states (16 bytes) in the tracker and the CUDA generator.
    for recorded in (True, False):  # with the device kind, and an older one without
        crafted = copy.deepcopy(saved)
        crafted["rng_tracker_states"] = {k: torch.arange(16, dtype=torch.uint8) for k in names}
        crafted["cuda_rng_state"] = torch.arange(16, dtype=torch.uint8)
        if recorded:
            crafted["device"] = "cuda"
        else:
            del crafted["device"]
        # What the old restore did: hand them to the CPU tracker; the first fork fails.
        bad = cpu_compat.CpuRNGStatesTracker()
        bad.set_states(crafted["rng_tracker_states"])
        try:
            with bad.fork(names[0]):
                pass
            res["raw_fork_fails"] = False
        except RuntimeError:
            res["raw_fork_fails"] = True
        random.random(); np.random.rand(); torch.rand(3)  # move the host RNGs on
        restored = set_rng_state(crafted, seed=7)
        after = states()
        host = (random.getstate() == crafted["random_rng_state"],
                torch.equal(torch.get_rng_state(), crafted["torch_rng_state"]),
                np.array_equal(np.random.get_state()[1], crafted["np_rng_state"][1]))
        first = draw()  # forks work
        tensor_parallel.model_parallel_cuda_manual_seed(7)  # what start-up seeding gives
        fresh = states()
        tensor_parallel.model_parallel_cuda_manual_seed(8)
        other = states()
        res["recorded" if recorded else "inferred"] = {
            "restored": restored,
            "host_restored": all(host),
            "as_start_up": all(torch.equal(after[k], fresh[k]) for k in names),
            "seed_matters": not any(torch.equal(after[k], other[k]) for k in names),
            "forked": len(first) == len(names),
        }
    print("RESULT " + json.dumps(res))
    """
)


def test_cuda_states_resume_on_cpu_by_reseeding():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    assert len(res["names"]) == 3
    assert res["kind"] == "cpu" and res["sizes"] == [rng.CPU_STATE_BYTES]
    assert res["same_kind_restored"] is True and res["same_kind_continues"] is True
    assert res["raw_fork_fails"] is True
    want = {
        "restored": False,
        "host_restored": True,
        "as_start_up": True,
        "seed_matters": True,
        "forked": True,
    }
    assert res["recorded"] == want
    assert res["inferred"] == want
    notes = [x for x in proc.stdout.splitlines() if x.startswith("note: the checkpoint's RNG")]
    assert len(notes) == 2 and "saved on CUDA" in notes[0] and "--seed 7" in notes[0]
