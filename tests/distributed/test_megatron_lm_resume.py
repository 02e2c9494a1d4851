"""``pretrain_moe.py --load`` resumes checkpoints written by Megatron-LM's own trainer (issue 28).

The fixtures in ``tests/data/megatron_lm/`` were written by Megatron-LM ``core_v0.16.1``
(``pretrain_gpt.py`` on CPU, README there): a tiny MoE, EP=2 or TP=2 on 2 processes,
iterations 1-3,
megatron-core's mock data, with Megatron-LM's logged training losses. We resume the save root
at iteration 1 (its tracker rewritten to 1) and train iterations 2 and 3 with the same flags.
Iteration 2's loss needs the weights (Megatron-LM's local key names) and the batch at the
resumed data position (``args.consumed_train_samples``: megatron-core's mock dataset from that
sample index); iteration 3's also needs the step between them to be Megatron-LM's: Adam's
moments and step count (plain: keys without the ``chained_N.`` prefix; distributed: its
``dp_reshardable`` buckets) and the LR schedule. The RNG state (``(PP, TP, DP)``-sharded) is
restored without the re-seeding note.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_script

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 2-process trainings, ~15 s each

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "megatron_lm"

#: Megatron-LM's lm loss of iterations 2 and 3 and its validation loss after iteration 3, from
#: the fixtures' training logs (tests/data/megatron_lm/README.md; plain and distributed
#: optimizer agree exactly), per layout. Its log of iteration 2 is the mean of iterations 1
#: and 2: Megatron-LM's first log line (iteration 1) does not reset its loss sums
#: (``training_log``: ``should_reset = not is_first_iteration``), so iteration 2's own loss is
#: 2 x logged(2) - logged(1). Printed with 7 digits: compared to 3e-6.
MEGATRON_LM = {
    "ep2": {2: 2 * 6.241096 - 6.245936, 3: 6.237114, "valid": 6.226568},
    "tp2": {2: 2 * 6.240602 - 6.251592, 3: 6.219342, "valid": 6.219274},
}
LAYOUT = {
    "ep2": ["--expert-model-parallel-size", "2"],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}
TOL = 3e-6

#: make_fixtures.MODEL / DATA / TRAIN under our flag names (same meanings).
FLAGS = [
    "--num-layers", "2", "--hidden-size", "16", "--ffn-hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "32", "--num-experts", "4",
    "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-token-dispatcher-type", "alltoall", "--moe-aux-loss-coeff", "0.01",
    "--seed", "1234",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511",
    "--make-vocab-size-divisible-by", "64", "--split", "98,1,1",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant",
    "--lr-warmup-iters", "0", "--weight-decay", "0.01", "--clip-grad", "1.0",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--eval-iters", "1", "--eval-interval", "0", "--log-interval", "1", "--no-progress-bar",
]  # fmt: skip


def _root_at(fixture: str, iteration: int, tmp_path: Path) -> Path:
    """A copy of a fixture save root whose tracker names ``iteration``."""
    root = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, root)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


@pytest.mark.parametrize(
    "fixture, extra",
    [
        ("ep2_plain", []),
        ("ep2_distopt", ["--use-distributed-optimizer"]),
        ("tp2_plain", []),
        ("tp2_distopt", ["--use-distributed-optimizer"]),
    ],
)
def test_resumes_megatron_lm_checkpoint_where_megatron_lm_left_off(fixture, extra, tmp_path):
    layout = fixture.split("_")[0]
    root = _root_at(fixture, 1, tmp_path)
    out = tmp_path / "r.json"
    flags = [*FLAGS, *LAYOUT[layout], *extra, "--load", root, "--output-json", out]
    proc = run_script("pretrain_moe.py", flags, nproc=2)
    assert f"loaded full checkpoint {root / 'iter_0000001'} at iteration 1" in proc.stdout
    assert "RNG" not in proc.stdout  # restored: no re-seeding note
    result = json.loads(out.read_text())
    history = result["train_history"]
    assert [h["iteration"] for h in history] == [2, 3]
    # The data position: 4 samples consumed (Megatron-LM's args) + 2 steps of 4, 32 tokens each.
    assert result["consumed_tokens"] == 12 * 32
    assert all(h["lr"] == pytest.approx(1e-3) for h in history)
    want = MEGATRON_LM[layout]
    assert {h["iteration"]: h["loss"] for h in history} == pytest.approx(
        {2: want[2], 3: want[3]}, abs=TOL
    )
    # The held-out split from its start (Megatron-LM's consumed_valid_samples 0) after step 3.
    assert result["loss"] == pytest.approx(want["valid"], abs=TOL)


def test_resume_without_optimizer_state_differs(tmp_path):
    """Iteration 3's loss above depends on the loaded optimizer state: with fresh Adam moments
    the same resume gives another one (while iteration 2's, before any step, is the same)."""
    root = _root_at("ep2_plain", 1, tmp_path)
    out = tmp_path / "r.json"
    run_script(
        "pretrain_moe.py",
        [*FLAGS, *LAYOUT["ep2"], "--load", root, "--no-load-optim", "--no-load-rng",
         "--output-json", out],
        nproc=2,
    )  # fmt: skip
    losses = {h["iteration"]: h["loss"] for h in json.loads(out.read_text())["train_history"]}
    assert losses[2] == pytest.approx(MEGATRON_LM["ep2"][2], abs=TOL)
    assert abs(losses[3] - MEGATRON_LM["ep2"][3]) > 1e-5


def _stored_keys(ckpt: Path) -> set[str]:
    from megatron_wsm.checkpoint.keys import checkpoint_keys

    return {k for k in checkpoint_keys(ckpt) if "/shard_" not in k or k.startswith("rng_state")}


def test_our_checkpoint_of_a_megatron_lm_run_is_shaped_as_megatron_lms(tmp_path):
    """Resume Megatron-LM's iteration 1, save our full checkpoint at iteration 2, compare it with
    the one Megatron-LM saved at iteration 2, then resume ours: iteration 3 is Megatron-LM's.

    Same model keys (but the MoE pre-MLP norm, Megatron-LM's local-spec name vs TE's, ours),
    the same ``rng_state`` shards, ``args`` with the data position; our plain optimizer keeps its
    ``chained_N.`` keys (its content metadata says so to any loader, Megatron-LM's included).
    """
    import argparse

    from megatron_wsm.checkpoint.common_state import allowed_globals

    root = _root_at("ep2_plain", 1, tmp_path)
    save = tmp_path / "ours"
    common = [*FLAGS, *LAYOUT["ep2"]]
    run_script(
        "pretrain_moe.py",
        [*common, "--load", root, "--save", save, "--save-interval", "1", "--exit-interval", "2"],
        nproc=2,
    )
    ours, theirs = _stored_keys(save / "iter_0000002"), _stored_keys(root / "iter_0000002")
    renamed = {
        k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        for k in ours
        if not k.startswith(("optimizer.", "chained_"))
    }
    assert renamed == {k for k in theirs if not k.startswith("optimizer.")}
    assert {k for k in ours if k.startswith("rng_state/")} == {
        "rng_state/shard_0.0.0_1.1.2",
        "rng_state/shard_0.0.1_1.1.2",
    }
    with allowed_globals([argparse.Namespace]):
        import torch

        args = torch.load(save / "iter_0000002" / "common.pt", weights_only=True)["args"]
    assert (args.consumed_train_samples, args.expert_model_parallel_size) == (8, 2)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    out = tmp_path / "r.json"
    run_script("pretrain_moe.py", [*common, "--load", save, "--output-json", out], nproc=2)
    history = json.loads(out.read_text())["train_history"]
    assert [(h["iteration"], round(h["loss"], 6)) for h in history] == [
        (3, pytest.approx(MEGATRON_LM["ep2"][3], abs=TOL))
    ]


#: pretrain_moe.py saving RNG state as megatron-wsm did before Megatron-LM's layout: one state
#: per global rank (a world-shaped ShardedObject) under our older names.
OLD_RNG_LAYOUT = """
import sys

if __name__ == "__main__":
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_wsm import distributed as wdist
    from megatron_wsm.checkpoint import manager, rng

    capture = rng.capture
    OLD = {"random_rng_state": "random", "np_rng_state": "numpy", "torch_rng_state": "torch",
           "rng_tracker_states": "tracker"}

    def old_capture():
        return {OLD.get(k, k): v for k, v in capture().items() if k != "cuda_rng_state"}

    def old_object(self, value):
        value = value[0] if isinstance(value, list) else value
        return ShardedObject("rng_state", value, (self.layout.world_size,), (wdist.rank(),),
                             replica_id=0)

    rng.capture = old_capture
    manager.CheckpointManager._rng_object = old_object
    from megatron_wsm.pretrain import main

    sys.exit(main())
"""


def test_our_older_world_shaped_rng_state_still_resumes(tmp_path):
    wrapper = tmp_path / "pretrain_old_rng_layout.py"
    wrapper.write_text(OLD_RNG_LAYOUT)
    root = _root_at("ep2_plain", 1, tmp_path)
    save = tmp_path / "old"
    common = [*FLAGS, *LAYOUT["ep2"]]
    run_script(
        str(wrapper),
        [*common, "--load", root, "--save", save, "--save-interval", "1", "--exit-interval", "2"],
        nproc=2,
    )
    from megatron_wsm.checkpoint.keys import checkpoint_keys

    stored = checkpoint_keys(save / "iter_0000002")
    assert {k for k in stored if k.startswith("rng_state/")} == {
        "rng_state/shard_0_2",
        "rng_state/shard_1_2",
    }
    out = tmp_path / "r.json"
    proc = run_script("pretrain_moe.py", [*common, "--load", save, "--output-json", out], nproc=2)
    assert "RNG" not in proc.stdout  # found and restored: no note about another layout
    history = json.loads(out.read_text())["train_history"]
    assert [h["iteration"] for h in history] == [3]
    assert history[0]["loss"] == pytest.approx(MEGATRON_LM["ep2"][3], abs=TOL)


@pytest.mark.parametrize(
    "fixture, change, message",
    [
        ("ep2_plain", ["--hidden-size", "32"], "holds another model: (checkpoint, this run) "
         "differ in {'hidden_size': (16, 32)}"),
        ("ep2_distopt", [], "its optimizer state is from the distributed optimizer and this "
         "run uses the plain one"),
    ],
)  # fmt: skip
def test_megatron_lm_checkpoint_of_another_model_or_optimizer_is_refused(
    fixture, change, message, tmp_path
):
    """Without our manifest the checks read Megatron-LM's args and content metadata: one clear
    error (exit 2) instead of a shape or key error from inside megatron-core."""
    root = _root_at(fixture, 1, tmp_path)
    proc = run_script(
        "pretrain_moe.py", [*FLAGS, *LAYOUT["ep2"], *change, "--load", root], nproc=2, check=False
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and message in errors[0], proc.stderr[-3000:]
