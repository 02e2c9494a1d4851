"""The WSM merge with 2 merge processes (torchrun + gloo), and loading its output in megatron-core.

Inputs are the synthetic torch_dist checkpoints shared with tests/unit/test_merge.py (saved by
2 ranks with TP-split, EP-distributed and replicated tensors). Two merge ranks split the items
(and single tensors, with a small --chunk-mb) between them and must produce byte-for-byte the
files one rank produces; the output must load with megatron-core's dist_checkpointing, in the
saving layout and resharded to another world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint import dcp_format as fmt
from megatron_wsm.checkpoint.manifest import read_manifest
from megatron_wsm.merge import merge_checkpoints
from megatron_wsm.testing import synthetic as syn
from tests.helpers import run_script

pytestmark = pytest.mark.distributed

COEFS = [0.2, 0.3, 0.5]
MERGE = "tools/merge_wsm.py"


def distcp_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.distcp"))}


def _args(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["--inputs", *map(str, inputs), "--weights", ",".join(map(str, COEFS)),
            "--save", str(out), "--no-progress-bar", *extra]


@pytest.mark.parametrize("output_dtype", ["same"])  # fp32/bf16 conversions: unit tests
def test_two_merge_ranks_match_one_rank_and_reference(
    window: list[Path], tmp_path: Path, output_dtype: str
):
    one, two = tmp_path / "one", tmp_path / "two"
    merge_checkpoints(window, COEFS, one, output_dtype=output_dtype, chunk_mb=0.005)
    proc = run_script(MERGE, _args(window, two, "--chunk-mb", "0.005", "--output-dtype",
                                   output_dtype), nproc=2)
    assert "with 2 rank(s)" in proc.stdout
    assert distcp_bytes(one) == distcp_bytes(two) and distcp_bytes(two)
    merged = syn.load_reference(two)
    reference = syn.reference_average(window, COEFS)
    for key, expect in reference.items():
        value = merged[key]
        tol = (1e-5, 8e-3) if value.dtype == torch.bfloat16 else (1e-7, 1e-5)
        torch.testing.assert_close(value.double(), expect, atol=tol[0], rtol=tol[1])
    assert read_manifest(two).extra["provenance"]["merge_ranks"] == 2


def test_two_rank_refusal_writes_nothing(window: list[Path], tmp_path: Path):
    bad = tmp_path / "w20"
    shutil.copytree(window[1], bad)
    _poison_last_item(bad)  # the last file's items are streamed by rank 1
    out = tmp_path / "merged"
    proc = run_script(MERGE, _args([window[0], bad, window[2]], out, "--chunk-mb", "0.005"),
                      nproc=2, check=False)
    assert proc.returncode != 0
    assert "NaN/Inf" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged.merging-*"))


def test_two_rank_bit_rot_is_refused(window: list[Path], tmp_path: Path):
    """A flipped bit in an item streamed by merge rank 1: its partial CRCs reach rank 0, are
    combined and compared with the input's zip record."""
    bad = tmp_path / "w20"
    shutil.copytree(window[1], bad)
    _poison_last_item(bad, b"\x01")  # the last item of the last file: rank 1's share
    out = tmp_path / "merged"
    proc = run_script(MERGE, _args([window[0], bad, window[2]], out, "--chunk-mb", "0.005"),
                      nproc=2, check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # torchrun: 1 when a rank exits 2
    assert "CRC-32 mismatch" in proc.stderr and str(bad) in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged.merging-*"))


def _poison_last_item(ckpt: Path, value: bytes | None = None) -> None:
    md = fmt.read_metadata(str(ckpt))
    floats = [
        (info.relative_path, info.offset, info.length)
        for index, info in md.storage_data.items()
        if index.fqn.endswith(".weight") and not index.fqn.startswith("optimizer.")
    ]
    rel, offset, length = max(floats)
    with open(ckpt / rel, "r+b") as f:
        read = lambda o, n: (f.seek(offset + o), f.read(n))[1]  # noqa: E731
        blob = fmt.describe_tensor_blob(fmt.BlobReader(read, length))
        if value is not None:  # flip low bits in the middle of the item (stays finite)
            pos = offset + blob.data_offset + blob.data_size // 2
            f.seek(pos)
            old = f.read(1)
            f.seek(pos)
            f.write(bytes([old[0] ^ value[0]]))
            return
        f.seek(offset + blob.data_offset + blob.data_size - 8)
        f.write(b"\xc0\x7f" * 4)  # bf16 NaN


def test_merged_checkpoint_loads_in_megatron(window: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    merge_checkpoints(window, COEFS, out)
    job = {"load": [
        {"ckpt": str(out), "out": str(tmp_path / "same_layout"), "world": 2,
         "spec": {"dtype": "bf16"}},
        {"ckpt": str(out), "out": str(tmp_path / "resharded"), "world": 1,
         "spec": {"dtype": "bf16"}},
    ]}
    syn.run_job_cached(job, tmp_path / "job")
    merged = syn.load_reference(out)
    assert syn.check_loaded_shards(str(tmp_path / "same_layout"), 2, merged) > 20
    assert syn.check_loaded_shards(str(tmp_path / "resharded"), 1, merged) > 10


def test_two_rank_legacy_merge(tmp_path: Path):
    spec = syn.SyntheticSpec(num_layers=2, hidden=16, ffn=16)
    inputs = [
        syn.save_legacy(tmp_path / f"iter_{it:07d}", spec, seed=it, iteration=it, world=2)
        for it in (10, 20, 30)
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    merge_checkpoints(inputs, COEFS, one)
    run_script(MERGE, _args(inputs, two), nproc=2)
    for rank_dir in ("mp_rank_00", "mp_rank_01"):
        a = torch.load(one / rank_dir / "model_optim_rng.pt", weights_only=False)["model"]
        b = torch.load(two / rank_dir / "model_optim_rng.pt", weights_only=False)["model"]
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]


@pytest.mark.slow
def test_trainer_full_and_window_checkpoints_merge_model_only(data_cache, tmp_path: Path):
    """Issues 18 and 12.6: full checkpoints of the real trainer merge into a model-only
    checkpoint (optimizer and RNG dropped, counted), with 1 and 2 merge processes; a save root
    holding full and window checkpoints merges through --load-dir; the output evaluates."""
    import json

    from megatron_wsm.checkpoint import integrity as ckpt_integrity
    from megatron_wsm.merge.torch_dist import is_dropped
    from tests.helpers import TINY_MODEL, run_pretrain

    save = tmp_path / "ckpt"
    args = [*TINY_MODEL, "--data-cache-dir", data_cache]
    run_pretrain([*args, "--train-iters", "6", "--save", save, "--save-interval", "2",
                  "--wsm-interval", "3"], tmp_path / "train.json")
    full = [save / f"iter_{it:07d}" for it in (2, 4, 6)]
    in_keys = ckpt_integrity.load_metadata(full[-1]).state_dict_metadata
    dropped = sorted(k for k in in_keys if is_dropped(k))
    assert any(".exp_avg_sq." in k for k in dropped) and any("rng_state" in k for k in dropped)
    for nproc in (1, 2):
        out = tmp_path / f"merged_{nproc}"
        proc = run_script(MERGE, ["--inputs", *map(str, full), "--method", "mean", "--save",
                                  str(out), "--no-progress-bar", "--json"], nproc=nproc)
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert report["dropped_keys"] == dropped
        out_keys = ckpt_integrity.load_metadata(out).state_dict_metadata
        assert not [k for k in out_keys if is_dropped(k) or "optimizer" in k]
        assert read_manifest(out).extra["provenance"]["dropped"]["count"] == len(dropped)
    mixed = tmp_path / "mixed"
    proc = run_script(MERGE, ["--load-dir", str(save), "--window-iters", "4", "--method",
                              "mean", "--save", str(mixed), "--no-progress-bar", "--json"])
    kinds = [row["kind"] for row in json.loads(proc.stdout[proc.stdout.index("{"):])["inputs"]]
    assert kinds == ["full", "window", "full", "window"]  # iterations 2, 3, 4, 6
    result = run_pretrain([*args, "--eval-only", "--load", tmp_path / "merged_1"],
                          tmp_path / "eval.json")
    assert result["loss"] == result["loss"] and 0 < result["loss"] < 20
