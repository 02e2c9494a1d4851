"""Tests of the WSM merge (megatron_wsm.merge, tools/merge_wsm.py) with one merge process.

Inputs are real megatron-core torch_dist checkpoints of a synthetic MoE state dict, saved by
2 gloo ranks (TP-split attention/embeddings, EP-distributed experts, replicated norms/router)
in a child process (:func:`megatron_wsm.testing.synthetic.run_job_cached`), shared with
tests/distributed/test_merge_distributed.py. The reference loads every input fully with plain
torch and averages in float64.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint import dcp_format as fmt
from megatron_wsm.checkpoint.manifest import read_manifest, write_manifest
from megatron_wsm.merge import MergeError, merge_checkpoints, select_window
from megatron_wsm.merge.torch_dist import DELAY_ENV, is_dropped
from megatron_wsm.testing import synthetic as syn

ROOT = Path(__file__).resolve().parents[2]
WINDOW = syn.TEST_WINDOW
COEFS = [0.2, 0.3, 0.5]
#: Tolerance of an averaged tensor stored in each dtype (one rounding of the fp32 result).
TOL = {torch.bfloat16: (1e-5, 8e-3), torch.float32: (1e-7, 1e-5)}


def build_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared synthetic checkpoints (built on first use in this pytest session)."""
    return syn.build_test_checkpoints(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoints(tmp_path_factory)


@pytest.fixture()
def window(ckpts: Path) -> list[Path]:
    return [ckpts / name for name in WINDOW]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = list(out.parent.glob(f".{out.name}.merging-*"))
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def assert_matches_reference(
    out: Path, inputs: list[Path], coefs: list[float], expect_dtype: dict[str, torch.dtype] | None
) -> dict[str, torch.Tensor]:
    merged = syn.load_reference(out)
    reference = syn.reference_average(inputs, coefs)
    newest = syn.load_reference(inputs[-1])
    assert not [k for k in merged if k.startswith("optimizer.")], "optimizer state not dropped"
    for key, value in merged.items():
        if key in reference:
            if expect_dtype is not None:
                assert value.dtype == expect_dtype.get(key, value.dtype), key
            atol, rtol = TOL[value.dtype]
            torch.testing.assert_close(value.double(), reference[key], atol=atol, rtol=rtol)
        else:
            assert torch.equal(value, newest[key]), f"{key} not copied from the newest input"
    assert set(reference) <= set(merged)
    return merged


def raw_item(ckpt: Path, fqn_part: str) -> bytes:
    """Bytes of the first storage item whose key contains ``fqn_part``."""
    md = fmt.read_metadata(str(ckpt))
    for index, info in md.storage_data.items():
        if fqn_part in index.fqn:
            with open(ckpt / info.relative_path, "rb") as f:
                f.seek(info.offset)
                return f.read(info.length)
    raise KeyError(fqn_part)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("output_dtype", ["same", "fp32", "bf16"])
def test_merge_matches_float64_reference(window: list[Path], tmp_path: Path, output_dtype: str):
    out = tmp_path / "merged"
    # A tiny chunk splits every tensor item into several pieces.
    report = merge_checkpoints(window, COEFS, out, output_dtype=output_dtype, chunk_mb=0.005)
    bias = "decoder.layers.mlp.router.expert_bias"
    if output_dtype == "same":
        expect = {bias: torch.float32, "output_layer.weight": torch.bfloat16}
    else:
        dt = torch.float32 if output_dtype == "fp32" else torch.bfloat16
        expect = {bias: dt, "output_layer.weight": dt}
    assert_matches_reference(out, window, COEFS, expect)
    assert report.merge_ranks == 1 and report.bytes_written > 0
    assert bias in report.averaged_keys  # a float buffer: averaged, and said so
    assert "decoder.layers.mlp.router.token_counts" in report.copied_keys
    assert all(is_dropped(k) for k in report.dropped_keys) and report.dropped_keys


def test_merged_checkpoint_metadata_and_provenance(window: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    merge_checkpoints(window, COEFS, out, method={"method": "custom"})
    manifest = read_manifest(out)
    assert manifest is not None and manifest.complete and manifest.kind == "merged"
    assert manifest.iteration == 30 and manifest.consumed_tokens == 30 * 1024
    prov = json.loads((out / "wsm_merge_provenance.json").read_text())
    assert prov["coefficients"] == COEFS
    assert prov["implied_decay"] == pytest.approx([0.8, 0.5])
    assert [row["iteration"] for row in prov["inputs"]] == [10, 20, 30]
    assert "optimizer state and RNG state dropped" in prov["dropped"]["note"]
    assert prov["averaged"]["floating_buffers"] == ["decoder.layers.mlp.router.expert_bias"]
    assert manifest.extra["provenance"]["coefficients"] == COEFS
    common = torch.load(out / "common.pt", weights_only=True)
    assert common["iteration"] == 30 and "optimizer" not in common
    assert "opt_param_scheduler" in common  # scheduler state comes from the newest input
    assert (out / "metadata.json").read_text() == (window[-1] / "metadata.json").read_text()
    # Objects (_extra_state) are the newest input's, byte for byte; RNG state is dropped.
    extra = "linear_qkv._extra_state"
    assert raw_item(out, extra) == raw_item(window[-1], extra)
    keys = fmt.read_metadata(str(out)).state_dict_metadata
    assert not any(k.startswith("rng_state") for k in keys)
    # Every merged item is a valid zip with correct CRCs, loadable by torch.
    blob = raw_item(out, "linear_fc1.weight")
    assert zipfile.ZipFile(io.BytesIO(blob)).testzip() is None
    assert torch.load(io.BytesIO(blob), weights_only=True).dtype == torch.bfloat16
    md = fmt.read_metadata(str(out))
    assert not any(k.startswith("optimizer.") for k in md.state_dict_metadata)
    assert getattr(md, "all_local_plans", None) is None


def test_output_is_independent_of_chunk_size_and_input_order(window: list[Path], tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    merge_checkpoints(window, COEFS, a, chunk_mb=0.005)
    merge_checkpoints(list(reversed(window)), COEFS, b, chunk_mb=64)  # sorted by iteration
    files = sorted(p.name for p in a.glob("*.distcp"))
    assert files == sorted(p.name for p in b.glob("*.distcp")) and files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_zero_coefficient_input_is_not_read(window: list[Path], tmp_path: Path):
    bad = copy_ckpt(window[0], tmp_path / "w10")
    _poison(bad, "output_layer.weight")
    out = tmp_path / "merged"
    report = merge_checkpoints([bad, *window[1:]], [0.0, 0.5, 0.5], out)
    assert any("coefficient 0" in n for n in report.notes)
    assert_matches_reference(out, window, [0.0, 0.5, 0.5], None)


def test_dry_run_writes_nothing(window: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    report = merge_checkpoints(window, COEFS, out, dry_run=True)
    assert report.dry_run and report.bytes_read > report.bytes_written > 0
    assert_nothing_written(out)
    assert merge_checkpoints(window, COEFS, None, dry_run=True).bytes_written > 0


def test_overwrite_replaces_existing_output(window: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    merge_checkpoints(window, [1 / 3] * 3, out)
    before = read_manifest(out).extra["provenance"]["coefficients"]
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge_checkpoints(window, COEFS, out)
    merge_checkpoints(window, COEFS, out, overwrite=True)
    after = read_manifest(out).extra["provenance"]["coefficients"]
    assert before != after == COEFS and read_manifest(out).kind == "merged"


def test_foreign_checkpoints_need_allow_no_manifest(window: list[Path], tmp_path: Path):
    foreign = [copy_ckpt(p, tmp_path / p.name) for p in window]
    for p in foreign:
        (p / "wsm_manifest.json").unlink()
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="no wsm_manifest.json"):
        merge_checkpoints(foreign, COEFS, out)
    assert_nothing_written(out)
    report = merge_checkpoints(foreign, COEFS, out, allow_no_manifest=True)
    assert any("no manifest" in n for n in report.notes)
    assert read_manifest(out).iteration == 30  # read from the newest input's common.pt
    assert_matches_reference(out, window, COEFS, None)


# ----------------------------------------------------------------------------- refusals


def _poison(ckpt: Path, fqn_part: str, value: bytes = b"\xc0\x7f") -> None:
    """Overwrite a few elements of an item's bf16 storage (default NaN, 0x7FC0)."""
    md = fmt.read_metadata(str(ckpt))
    for index, info in md.storage_data.items():
        if fqn_part in index.fqn:
            path = ckpt / info.relative_path
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = fmt.describe_tensor_blob(fmt.BlobReader(
                    lambda o, n, f=f, base=info.offset: (f.seek(base + o), f.read(n))[1],
                    info.length,
                ))
            with open(path, "r+b") as f:
                f.seek(info.offset + blob.data_offset + 6)
                f.write(value * 4)
            return
    raise KeyError(fqn_part)


def _edit_manifest(ckpt: Path, **changes) -> None:
    manifest = read_manifest(ckpt)
    for key, value in changes.items():
        if key.startswith("parallel."):
            setattr(manifest.parallel, key.split(".", 1)[1], value)
        else:
            setattr(manifest, key, value)
    write_manifest(ckpt, manifest)


def _drop_key(ckpt: Path, fqn: str) -> None:
    md = fmt.read_metadata(str(ckpt))
    del md.state_dict_metadata[fqn]
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != fqn}
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _truncate_largest(ckpt: Path) -> None:
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def _corrupt_item(ckpt: Path) -> None:
    md = fmt.read_metadata(str(ckpt))
    index, info = next(
        (i, v) for i, v in md.storage_data.items() if i.fqn == "output_layer.weight"
    )
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length - 22)
        f.write(b"\0" * 22)  # wipe the end-of-central-directory record


TAMPERS = {
    "config hash": (lambda p: _edit_manifest(p, model_config_hash="another00000000"),
                    "different models cannot be merged"),
    "manifest layout": (lambda p: _edit_manifest(p, **{"parallel.tensor_model_parallel_size": 1}),
                        "tensor_model_parallel_size"),
    "incomplete": (lambda p: _edit_manifest(p, complete=False), "incomplete"),
    "no manifest": (lambda p: (p / "wsm_manifest.json").unlink(), "no wsm_manifest.json"),
    "missing .metadata": (lambda p: (p / ".metadata").unlink(), "missing .metadata"),
    "key set": (lambda p: _drop_key(p, "decoder.layers.mlp.router.weight"),
                "hold different tensors"),
    "truncated shard": (_truncate_largest, "truncated"),
    "corrupt item": (_corrupt_item, "not a torch.save zip blob"),
    "nan": (lambda p: _poison(p, "linear_fc1.weight"), "NaN/Inf in decoder.layers.mlp"),
    "inf": (lambda p: _poison(p, "embedding.word_embeddings", b"\x80\x7f"),
            "NaN/Inf in embedding"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_refuses_broken_or_mismatched_input(window: list[Path], tmp_path: Path, case: str):
    tamper, message = TAMPERS[case]
    middle = copy_ckpt(window[1], tmp_path / "w20")
    tamper(middle)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=message):
        merge_checkpoints([window[0], middle, window[2]], COEFS, out)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("other", "message"),
    [
            ("shape40", r"shape \(128, 32\) in .* but \(128, 48\)"),
            ("fp32_40", "dtype torch.bfloat16 in .* but torch.float32"),
        ("layout40", "sharded differently"),
    ],
)
def test_refuses_other_shapes_dtypes_layouts(ckpts: Path, tmp_path: Path, other, message):
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=message):
        merge_checkpoints([ckpts / "w10", ckpts / "w20", ckpts / other], COEFS, out)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("coefs", "message"),
    [([0.2, 0.3, 0.6], "sum to 1"), ([0.6, -0.1, 0.5], "negative"), ([0.5, 0.5], "2 coefficients")],
)
def test_refuses_bad_coefficients(window: list[Path], tmp_path: Path, coefs, message):
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(window, coefs, out)
    assert_nothing_written(out)


def test_refuses_duplicates_and_output_inside_input(window: list[Path], tmp_path: Path):
    with pytest.raises(MergeError, match="given twice"):
        merge_checkpoints([window[0], window[0], window[1]], COEFS, tmp_path / "m")
    with pytest.raises(MergeError, match="is or lies inside"):
        merge_checkpoints(window, COEFS, window[0], overwrite=True)
    assert read_manifest(window[0]).kind == "window"


def test_kill_mid_merge_leaves_no_output(window: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{DELAY_ENV: "0.2"})
    cmd = [sys.executable, str(ROOT / "tools/merge_wsm.py"), "--inputs", *map(str, window),
           "--weights", "0.2,0.3,0.5", "--save", str(out), "--chunk-mb", "0.005",
           "--no-progress-bar"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".merged.merging-*/*.distcp")):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "merge never started writing"
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the streaming phase (hundreds of delayed pieces)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    # The next merge says the interrupted one left a temporary directory, and succeeds.
    report = merge_checkpoints(window, COEFS, out)
    assert any("stale temporary" in n for n in report.notes)


# ----------------------------------------------------------------------------- legacy format


def test_legacy_torch_format(tmp_path: Path):
    spec = syn.SyntheticSpec(num_layers=2, hidden=16, ffn=16)
    inputs = [
        syn.save_legacy(tmp_path / f"iter_{it:07d}", spec, seed=it, iteration=it)
        for it in (10, 20, 30)
    ]
    out = tmp_path / "merged"
    report = merge_checkpoints(inputs, COEFS, out, output_dtype="fp32", chunk_mb=0.005)
    assert report.format == "torch" and read_manifest(out).checkpoint_format == "torch"
    for rank_dir in ("mp_rank_00", "mp_rank_01"):
        merged = torch.load(out / rank_dir / "model_optim_rng.pt", weights_only=False)
        states = [torch.load(p / rank_dir / "model_optim_rng.pt", weights_only=False)
                  for p in inputs]
        assert "optimizer" not in merged and merged["iteration"] == 30
        assert merged["args"].seed == 30  # non-model entries come from the newest input
        for key, value in merged["model"].items():
            newest = states[-1]["model"][key]
            if torch.is_tensor(newest) and newest.is_floating_point():
                expect = sum(c * s["model"][key].double() for c, s in zip(COEFS, states))
                torch.testing.assert_close(value.double(), expect, atol=1e-7, rtol=1e-5)
            elif torch.is_tensor(newest):
                assert torch.equal(value, newest)
            else:
                assert value == newest
    bad = tmp_path / "bad"
    shutil.copytree(inputs[1], bad)
    state = torch.load(bad / "mp_rank_01/model_optim_rng.pt", weights_only=False)
    state["model"]["output_layer.weight"][0, 0] = float("inf")
    torch.save(state, bad / "mp_rank_01/model_optim_rng.pt")
    with pytest.raises(MergeError, match="NaN/Inf in mp_rank_01/model/output_layer.weight"):
        merge_checkpoints([inputs[0], bad, inputs[2]], COEFS, tmp_path / "m2")
    assert_nothing_written(tmp_path / "m2")


# ----------------------------------------------------------------------------- --load-dir


def _manifest_only(root: Path, name: str, iteration: int, kind: str = "window", **kw) -> None:
    manifest = syn.synthetic_manifest(syn.SyntheticSpec(), iteration, 1, kind=kind)
    for key, value in kw.items():
        setattr(manifest, key, value)
    (root / name).mkdir(parents=True)
    write_manifest(root / name, manifest)


def test_select_window_from_manifests(tmp_path: Path):
    for it in (100, 200, 300, 400, 500):
        _manifest_only(tmp_path, f"iter_{it:07d}", it)
    _manifest_only(tmp_path, "full/iter_0000500", 500, kind="full")  # same iteration: skipped
    _manifest_only(tmp_path, "iter_0000600", 600, complete=False)  # unfinished: never chosen
    _manifest_only(tmp_path, "iter_0000700", 700, kind="merged")  # merges are not inputs
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(select_window(tmp_path, window_iters=200)) == [
        "iter_0000300", "iter_0000400", "iter_0000500"]
    assert select_window(tmp_path, window_iters=200)[-1].parent == tmp_path  # window preferred
    assert names(select_window(tmp_path, window_tokens=100 * 1024)) == [
        "iter_0000400", "iter_0000500"]
    assert names(select_window(tmp_path, count=4)) == [
        "iter_0000200", "iter_0000300", "iter_0000400", "iter_0000500"]
    with pytest.raises(MergeError, match="at least 2"):
        select_window(tmp_path, window_iters=50)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> tuple[int, str, str]:
    import contextlib

    from megatron_wsm.cli.merge_wsm import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_help_explains_options():
    code, out, _ = run_cli("--help")
    assert code == 0
    for flag in ("--inputs", "--load-dir", "--window-iters", "--window-tokens", "--count",
                 "--method", "--weights", "--save", "--output-dtype", "--dry-run", "--chunk-mb",
                 "--overwrite", "--allow-no-manifest", "--positions-from", "--convention",
                 "--sampling", "--skip-incomplete"):
        assert flag in out
    wrapper = subprocess.run([sys.executable, str(ROOT / "tools/merge_wsm.py"), "--help"],
                             capture_output=True, text=True, timeout=120)
    assert wrapper.returncode == 0 and "--load-dir" in wrapper.stdout


def test_cli_dry_run_prints_coefficients_and_decay(window: list[Path], tmp_path: Path):
    code, out, err = run_cli("--inputs", *map(str, window), "--method", "linear", "--dry-run",
                             "--save", str(tmp_path / "m"))
    assert code == 0, err
    assert "would merge 3 torch_dist checkpoints" in out
    assert "coefficients: 0.000000, 0.500000, 0.500000" in out
    assert "implied decay w_1..w_k: 1.000000, 0.500000" in out
    assert "read" in out and not (tmp_path / "m").exists()


def test_cli_load_dir_merges_newest_window(window: list[Path], tmp_path: Path):
    root = tmp_path / "ckpts"
    root.mkdir()
    for p in window:
        shutil.copytree(p, root / p.name)  # a symlinked entry would be refused
    code, out, err = run_cli("--load-dir", str(root), "--window-iters", "10", "--method", "mean",
                             "--save", str(tmp_path / "m"), "--no-progress-bar", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["iteration"] for r in report["inputs"]] == [20, 30]
    assert report["coefficients"] == [0.0, 1.0]
    prov = json.loads((tmp_path / "m/wsm_merge_provenance.json").read_text())
    assert prov["method"]["selection"]["window_iters"] == 10


def test_cli_provenance_holds_the_merge_method(window: list[Path], tmp_path: Path):
    from megatron_wsm.coefficients import MergeMethod

    code, _, err = run_cli("--inputs", *map(str, window), "--decay", "1,0.25", "--save",
                           str(tmp_path / "m"), "--no-progress-bar")
    assert code == 0, err
    prov = json.loads((tmp_path / "m/wsm_merge_provenance.json").read_text())["method"]
    assert prov["k"] == 2 and prov["positions_from"] == "iteration"
    extra = ("k", "positions_from", "coefficient_rule", "selection")
    fields = {key: v for key, v in prov.items() if key not in extra}
    # The provenance reads back as the method that weighted the inputs.
    method = MergeMethod.from_json(fields)
    assert method == MergeMethod("custom", decay=(1.0, 0.25))
    assert prov["coefficient_rule"]["coefficients"] == method.coefficients(2)
    code, _, err = run_cli("--inputs", *map(str, window), "--method", "linear", "--weights",
                           "0,0.5,0.5", "--dry-run")
    assert code == 2 and "give only one of --method, --weights, --decay" in err


def test_cli_errors_are_one_line_and_exit_2(window: list[Path], tmp_path: Path):
    code, _, err = run_cli("--inputs", *map(str, window), "--weights", "0.2,0.2,0.2",
                           "--save", str(tmp_path / "m"))
    assert code == 2 and err.startswith("merge_wsm: error:") and "sum to 1" in err
    assert err.count("\n") == 1 and not (tmp_path / "m").exists()
    code, _, err = run_cli("--inputs", *map(str, window), "--method", "mean")
    assert code == 2 and "--save is required" in err


# ----------------------------------------------------------------------------- byte format


def test_crc32_combine_matches_zlib():
    rng = torch.Generator().manual_seed(0)
    for n1, n2 in [(0, 5), (5, 0), (1, 1), (1000, 4097), (65536, 3)]:
        a = bytes(torch.randint(0, 256, (n1,), generator=rng, dtype=torch.uint8).tolist())
        b = bytes(torch.randint(0, 256, (n2,), generator=rng, dtype=torch.uint8).tolist())
        assert fmt.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _torch_save_bytes(obj: object) -> bytes:
    """``torch.save`` of ``obj`` into bytes (a reference blob)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("src", sorted(fmt.STORAGE_CLASS_NAMES, key=str))
@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zip64", [False, True])
def test_built_blobs_load_in_torch(tmp_path: Path, src, dst, zip64):
    tensor = torch.randn(7, 3).to(src).t()  # non-contiguous strides survive the retyping
    blob = _torch_save_bytes(tensor)
    reader = fmt.BlobReader(lambda o, n: blob[o : o + n], len(blob))
    parsed = fmt.describe_tensor_blob(reader)
    records = []
    for record in parsed.records:
        if record is parsed.storage_record:
            records.append((record.name, tensor.numel() * dst.itemsize))
        elif record.name.endswith("data.pkl"):
            records.append((record.name, fmt.retype_tensor_pickle(parsed.pickle, src, dst)))
        else:
            records.append((record.name, reader.read(record.data_offset, record.size)))
    template = fmt.build_tensor_blob(records, force_zip64=zip64)
    # Storage order of the transposed tensor = row-major order of the original.
    payload = tensor.t().contiguous().to(dst).view(torch.uint8).numpy().tobytes()
    prefix, suffix = template.render(zlib.crc32(payload))
    (tmp_path / "t.pt").write_bytes(prefix + payload + suffix)
    assert len(prefix) % 64 == 0  # storage data aligned like torch's
    loaded = torch.load(tmp_path / "t.pt", weights_only=True, mmap=True)
    assert loaded.dtype == dst and loaded.stride() == tensor.stride()
    assert torch.equal(loaded, tensor.to(dst))
    assert zipfile.ZipFile(tmp_path / "t.pt").testzip() is None


def test_same_dtype_template_round_trips():
    blob = _torch_save_bytes(torch.arange(10.0))
    reader = fmt.BlobReader(lambda o, n: blob[o : o + n], len(blob))
    parsed = fmt.describe_tensor_blob(reader)
    data = blob[parsed.data_offset : parsed.data_offset + parsed.data_size]
    prefix, suffix = parsed.template(reader).render(zlib.crc32(data))
    assert prefix + data + suffix == blob


def test_non_zip_item_is_refused():
    junk = b"x" * 300
    with pytest.raises(fmt.FormatError, match="not a torch.save zip blob"):
        fmt.describe_tensor_blob(fmt.BlobReader(lambda o, n: junk[o : o + n], len(junk)))


@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize(("in_dtype", "out_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
])
def test_streaming_buffers_fit_the_chunk_budget(k, in_dtype, out_dtype):
    from types import SimpleNamespace

    from megatron_wsm.merge.torch_dist import ACTION_AVERAGE, plan_buffers

    item = SimpleNamespace(action=ACTION_AVERAGE, in_dtype=in_dtype, out_dtype=out_dtype)
    plan = SimpleNamespace(items=[item], coefficients=[1.0 / k] * k)
    chunk = 64 * 2**20
    buffers = plan_buffers(plan, chunk)
    assert buffers.total <= chunk and buffers.inputs == k
    # More inputs: smaller pieces, same memory.
    fewer = plan_buffers(SimpleNamespace(items=[item], coefficients=[0.5, 0.5]), chunk)
    assert buffers.elems <= fewer.elems and fewer.total <= chunk


# ------------------------------------------------- megatron-core >= 0.19 common-state layout


def test_embedded_common_state_is_ordered_stripped_and_written_as_common_pt(ckpts, tmp_path):
    """Inputs laid out as megatron-core >= 0.19 saves them (common state inside the shard
    files, no common.pt), without manifests and without a number in their names: their order
    comes from the embedded iteration, and the output's common state is the newest one's minus
    the optimizer, as a common.pt (which megatron-core 0.16 to 0.19 read) and not as an item."""
    newer, older = ckpts / "embedded_b", ckpts / "embedded_a"
    assert not (newer / "common.pt").exists()
    stored = fmt.read_metadata(str(newer)).state_dict_metadata
    assert any(k.startswith("common_state") for k in stored)
    out = tmp_path / "merged"
    report = merge_checkpoints([newer, older], [0.4, 0.6], out, allow_no_manifest=True)
    assert any("embedded common_state" in n for n in report.notes), report.notes
    assert read_manifest(out).iteration == 30  # ordered oldest first by the embedded iteration
    assert_matches_reference(out, [older, newer], [0.4, 0.6], None)
    common = torch.load(out / "common.pt", weights_only=True)
    assert common["iteration"] == 30 and "optimizer" not in common
    assert common["opt_param_scheduler"] == {"num_steps": 240, "max_lr": 1e-3}
    keys = fmt.read_metadata(str(out)).state_dict_metadata
    assert not any(k.startswith(("common_state", "optimizer.", "rng_state")) for k in keys)
    assert "common_state" not in " ".join(report.copied_keys + report.dropped_keys)
