"""Merge coefficients at the checkpoints' real positions, conventions and unfinished checkpoints
in a --load-dir window (tools/merge_wsm.py, megatron_wsm.merge; issues 12 and 18).

Inputs are the synthetic torch_dist checkpoints shared with tests/unit/test_merge.py; copies get
an edited manifest (iteration, tokens, complete) to build uneven or gapped windows.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_wsm import coefficients
from megatron_wsm.checkpoint.manifest import read_manifest, write_manifest
from megatron_wsm.cli import merge_wsm
from megatron_wsm.merge import (
    MergeError,
    choose_window,
    resolve_coefficients,
)
from megatron_wsm.testing import synthetic as syn

WINDOW = syn.TEST_WINDOW


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.build_test_checkpoints(tmp_path_factory.getbasetemp())


@pytest.fixture()
def window(ckpts: Path) -> list[Path]:
    return [ckpts / name for name in WINDOW]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = merge_wsm.main(list(args))
    return code, out.getvalue(), err.getvalue()


def placed(src: Path, dst: Path, iteration: int | None = None, **changes) -> Path:
    """A copy of ``src`` at ``dst`` (checkpoints found under a root are never symlinks), its
    manifest and common state moved to ``iteration`` and its manifest given ``changes``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    assert manifest is not None
    if iteration is not None:
        manifest.iteration = iteration
        manifest.consumed_tokens = iteration * 1024
        common = torch.load(dst / "common.pt", weights_only=False)  # our own synthetic file
        common["iteration"] = iteration  # the name, manifest and common state agree
        torch.save(common, dst / "common.pt")
    for key, value in changes.items():
        setattr(manifest, key, value)
    write_manifest(dst, manifest)
    return dst


def uneven_root(window: list[Path], root: Path) -> Path:
    """Checkpoints at iterations 0, 10, 20, 40 (iteration 30 missing): an uneven window."""
    placed(window[0], root / "iter_0000000", 0)
    placed(window[0], root / "iter_0000010")
    placed(window[1], root / "iter_0000020")
    placed(window[2], root / "iter_0000040", 40)
    return root


# ----------------------------------------------------------------------------- even = as before


@pytest.mark.parametrize("method", [m for m in coefficients.METHODS if m != "custom"])
@pytest.mark.parametrize("positions", [[10, 20, 30, 40], [0, 4096, 8192], [5, 6, 7, 8, 9, 10]])
def test_even_positions_give_bit_identical_coefficients(method, positions):
    k = len(positions) - 1
    before = coefficients.merge_coefficients(method, k, min_lr_ratio=0.1)
    assert resolve_coefficients(method, k, positions=positions, min_lr_ratio=0.1) == before
    assert resolve_coefficients(method, k, min_lr_ratio=0.1) == before


def test_even_window_merge_has_the_same_coefficients_whatever_the_unit(window, tmp_path):
    before = coefficients.merge_coefficients("1-sqrt", 2)  # what the tool computed by count
    got = {}
    for unit in ("iteration", "tokens", "index"):
        code, out, err = run_cli("--inputs", *map(str, window), "--method", "1-sqrt",
                                 "--positions-from", unit, "--dry-run", "--json")
        assert code == 0, err
        report = json.loads(out)
        got[unit] = report["coefficients"]
        assert report["coefficient_rule"]["position_unit"] == unit
        assert report["coefficient_rule"]["evenly_spaced"] is True
    assert got == {"iteration": before, "tokens": before, "index": before}
    code, out, _ = run_cli("--inputs", *map(str, window), "--method", "1-sqrt", "--dry-run",
                           "--json")
    assert json.loads(out)["coefficient_rule"]["positions"] == [10, 20, 30]  # the default


def test_resolve_coefficients_checks_positions():
    with pytest.raises(ValueError, match="3 positions given for 4 checkpoints"):
        resolve_coefficients("linear", 3, positions=[0, 1, 2])
    # Explicit weights are taken as given, wherever the checkpoints are.
    assert resolve_coefficients(None, 2, weights=[0.2, 0.3, 0.5], positions=[0, 1, 9]) == [
        0.2, 0.3, 0.5]
    # Mean sampling of linear over [0, 1/2], [1/2, 1]: w = 3/4, 1/4.
    assert resolve_coefficients("linear", 2, sampling="mean") == pytest.approx([0.25, 0.5, 0.25])


# ----------------------------------------------------------------------------- uneven windows


def test_uneven_load_dir_window_follows_the_iterations(window, tmp_path):
    root = uneven_root(window, tmp_path / "root")
    out = tmp_path / "merged"
    code, stdout, err = run_cli("--load-dir", str(root), "--method", "linear", "--save", str(out),
                                "--no-progress-bar", "--json")
    assert code == 0, err
    # linear at t = 0, 1/4, 1/2 (iterations 0, 10, 20 of the window 0..40): w = 1, 3/4, 1/2.
    expect = [0.0, 0.25, 0.25, 0.5]
    report = json.loads(stdout)
    assert report["coefficients"] == expect
    assert [r["iteration"] for r in report["inputs"]] == [0, 10, 20, 40]
    for prov in (json.loads((out / "wsm_merge_provenance.json").read_text()),
                 read_manifest(out).extra["provenance"]):
        assert prov["coefficients"] == expect
        rule = prov["method"]["coefficient_rule"]
        assert rule["positions"] == [0, 10, 20, 40] and rule["position_unit"] == "iteration"
        assert rule["evenly_spaced"] is False and rule["coefficients"] == expect
        assert (rule["convention"], rule["sampling"]) == ("wsm", "start")
        assert "t_j = (p_j - p_0)/(p_k - p_0)" in rule["discretisation"]
        assert rule["zero_weight_inputs"] == [0]
    # The weights reach the right checkpoints: the newest (w30's tensors) gets 1/2.
    key = "output_layer.weight"
    merged = syn.load_reference(out)[key].double()
    reference = syn.reference_average([window[0], window[0], window[1], window[2]], expect)[key]
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=8e-3)
    # By index the same checkpoints would be weighted as if evenly spaced.
    code, stdout, _ = run_cli("--load-dir", str(root), "--method", "linear", "--dry-run",
                              "--positions-from", "index", "--json")
    assert code == 0 and json.loads(stdout)["coefficients"] == pytest.approx([0, 1 / 3, 1 / 3,
                                                                              1 / 3])


def test_index_methods_ignore_uneven_positions_and_say_so(window, tmp_path):
    root = uneven_root(window, tmp_path / "root")
    code, stdout, err = run_cli("--load-dir", str(root), "--method", "mean", "--dry-run")
    assert code == 0, err
    assert "coefficients: 0.000000, 0.333333, 0.333333, 0.333333" in stdout
    assert "why: method 'mean' weights checkpoints by index" in stdout


def test_uneven_inputs_follow_tokens_and_1_sqrt(window, tmp_path):
    root = uneven_root(window, tmp_path / "root")
    given = [root / n for n in ("iter_0000040", "iter_0000000", "iter_0000020", "iter_0000010")]
    code, stdout, err = run_cli("--inputs", *map(str, given), "--method", "1-sqrt",
                                "--positions-from", "tokens", "--dry-run")
    assert code == 0, err
    w = [1 - math.sqrt(t) for t in (0.0, 0.25, 0.5)]
    c = [1 - w[0], w[0] - w[1], w[1] - w[2], w[2]]
    assert "coefficients: " + ", ".join(f"{x:.6f}" for x in c) in stdout
    assert "positions (tokens): 0, 10240, 20480, 40960 (unevenly spaced)" in stdout
    assert "inputs reordered by iteration" in stdout


def test_inputs_without_the_number_fall_back_to_index(window, tmp_path):
    bare = placed(window[1], tmp_path / "bare", 20)
    (bare / "wsm_manifest.json").unlink()  # a foreign checkpoint: iteration from common.pt only
    inputs = [str(window[0]), str(bare), str(window[2])]
    code, stdout, err = run_cli("--inputs", *inputs, "--method", "linear", "--positions-from",
                                "tokens", "--allow-no-manifest", "--dry-run", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["coefficient_rule"]["position_unit"] == "index"
    assert report["coefficient_rule"]["positions"] == [0, 1, 2]
    assert any("--positions-from tokens: no manifest" in n and "bare" in n and "by index" in n
               for n in report["notes"])
    # Its iteration is still known (common.pt), so the default unit needs no fallback.
    code, stdout, _ = run_cli("--inputs", *inputs, "--method", "linear", "--allow-no-manifest",
                              "--dry-run", "--json")
    assert code == 0 and json.loads(stdout)["coefficient_rule"]["position_unit"] == "iteration"


def test_tokens_that_do_not_increase_are_refused(window, tmp_path):
    odd = placed(window[1], tmp_path / "odd", consumed_tokens=5)
    code, _, err = run_cli("--inputs", str(window[0]), str(odd), str(window[2]), "--method",
                           "linear", "--positions-from", "tokens", "--dry-run")
    assert code == 2 and "odd is at tokens 5, not after the previous input's 10240" in err


# ----------------------------------------------------------------------------- conventions


def four_even(window: list[Path], tmp_path: Path) -> list[str]:
    return [*map(str, window), str(placed(window[2], tmp_path / "w40", 40))]


def test_megatron_lm_convention_weights_every_input(window, tmp_path):
    inputs = four_even(window, tmp_path)
    code, stdout, err = run_cli("--inputs", *inputs, "--method", "1-sqrt", "--convention",
                                "megatron-lm", "--dry-run")
    assert code == 0, err
    w = [1 - math.sqrt(i / 4) for i in (1, 2, 3)]  # w_i = f(i/(k+1))
    c = [1 - w[0], w[0] - w[1], w[1] - w[2], w[2]]
    assert c == pytest.approx([0.5, 0.2071068, 0.1589186, 0.1339746], abs=1e-7)
    assert "coefficients: " + ", ".join(f"{x:.6f}" for x in c) in stdout
    assert "convention: megatron-lm, sampling start: w_i = f(i/(k+1))" in stdout
    assert "weight 0" not in stdout
    code, stdout, err = run_cli("--inputs", *inputs, "--method", "mean", "--convention",
                                "megatron-lm", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(stdout)["coefficients"] == [0.25] * 4


def test_wsm_convention_says_which_input_gets_weight_0_and_why(window, tmp_path):
    inputs = four_even(window, tmp_path)
    code, stdout, err = run_cli("--inputs", *inputs, "--method", "1-sqrt", "--dry-run")
    assert code == 0, err
    assert "convention: wsm, sampling start: w_i = f((i-1)/k)" in stdout
    assert f"weight 0 (not read): input 0 ({inputs[0]})" in stdout
    assert "why: input 0 (the oldest) has weight 0: under convention 'wsm'" in stdout


def test_megatron_lm_convention_on_an_uneven_window_is_refused(window, tmp_path):
    root = uneven_root(window, tmp_path / "root")
    code, _, err = run_cli("--load-dir", str(root), "--method", "1-sqrt", "--convention",
                           "megatron-lm", "--dry-run")
    assert code == 2 and "unevenly spaced (iteration 0, 10, 20, 40)" in err
    assert "--positions-from index" in err
    code, stdout, err = run_cli("--load-dir", str(root), "--method", "1-sqrt", "--convention",
                                "megatron-lm", "--positions-from", "index", "--dry-run")
    assert code == 0 and "coefficients: 0.500000, 0.207107, 0.158919, 0.133975" in stdout


def test_mean_sampling_averages_the_decay_over_each_interval(window, tmp_path):
    root = uneven_root(window, tmp_path / "root")
    code, stdout, err = run_cli("--load-dir", str(root), "--method", "linear", "--sampling",
                                "mean", "--dry-run", "--json")
    assert code == 0, err
    # Mean of 1 - t over [0, 1/4], [1/4, 1/2], [1/2, 1]: 7/8, 5/8, 1/4.
    assert json.loads(stdout)["coefficients"] == pytest.approx([1 / 8, 1 / 4, 3 / 8, 1 / 4])


# ----------------------------------------------------------------------------- unfinished ones


def _manifest_only(root: Path, name: str, iteration: int, **changes) -> Path:
    manifest = syn.synthetic_manifest(syn.SyntheticSpec(), iteration, 1)
    for key, value in changes.items():
        setattr(manifest, key, value)
    (root / name).mkdir(parents=True)
    write_manifest(root / name, manifest)
    return root / name


@pytest.mark.parametrize("unfinished", ["complete_false", "tmp_dir", "no_manifest"])
def test_unfinished_checkpoint_inside_the_window_is_refused(tmp_path, unfinished):
    for it in (100, 200, 400):
        _manifest_only(tmp_path, f"iter_{it:07d}", it)
    if unfinished == "complete_false":
        _manifest_only(tmp_path, "iter_0000300", 300, complete=False)
        name, why = "iter_0000300", "complete: false"
    elif unfinished == "tmp_dir":
        (tmp_path / ".tmp-iter_0000300").mkdir()
        name, why = ".tmp-iter_0000300", "save in progress"
    else:
        (tmp_path / "iter_0000300").mkdir()
        name, why = "iter_0000300", "no wsm_manifest.json"
    pattern = rf"unfinished checkpoint.*{name} \(iteration 300, {why}.*--skip-incomplete"
    for selection in ({"count": 3}, {"window_iters": 200}):
        with pytest.raises(MergeError, match=pattern):
            choose_window(tmp_path, **selection)
    chosen = choose_window(tmp_path, count=3, skip_incomplete=True)
    assert [p.name for p in chosen.paths] == ["iter_0000100", "iter_0000200", "iter_0000400"]
    assert [(p.name, it) for p, it, _ in chosen.skipped] == [(name, 300)]


def test_unfinished_checkpoints_that_are_no_gap_are_ignored(tmp_path):
    for it in (100, 200, 300):
        _manifest_only(tmp_path, f"iter_{it:07d}", it)
    _manifest_only(tmp_path, "iter_0000400", 400, complete=False)  # the save under way
    (tmp_path / ".tmp-iter_0000050").mkdir()  # older than the window
    _manifest_only(tmp_path, "full/iter_0000200", 200, kind="full", complete=False)  # 200 is there
    chosen = choose_window(tmp_path, window_iters=200)
    assert [p.name for p in chosen.paths] == ["iter_0000100", "iter_0000200", "iter_0000300"]
    assert chosen.skipped == []


def test_unfinished_anchor_of_a_window_iters_window_is_refused(tmp_path):
    _manifest_only(tmp_path, "iter_0000100", 100, complete=False)
    for it in (200, 300, 400):
        _manifest_only(tmp_path, f"iter_{it:07d}", it)
    with pytest.raises(MergeError, match=r"iter_0000100 \(iteration 100"):
        choose_window(tmp_path, window_iters=300)
    assert len(choose_window(tmp_path, window_iters=200).paths) == 3


def test_skip_incomplete_through_the_cli(window, tmp_path):
    root = tmp_path / "root"
    placed(window[0], root / "iter_0000000", 0)
    placed(window[0], root / "iter_0000010")
    placed(window[1], root / "iter_0000020", 20, complete=False)  # a save that never finished
    placed(window[2], root / "iter_0000030")
    code, _, err = run_cli("--load-dir", str(root), "--method", "linear", "--dry-run")
    assert code == 2 and "iter_0000020 (iteration 20, complete: false)" in err
    code, _, err = run_cli("--load-dir", str(root), "--method", "linear", "--dry-run",
                           "--skip-incomplete", "--positions-from", "index")
    assert code == 2 and "--skip-incomplete needs --positions-from iteration or tokens" in err
    code, _, err = run_cli("--inputs", *map(str, window), "--skip-incomplete", "--dry-run")
    assert code == 2 and "--skip-incomplete needs --load-dir" in err
    out = tmp_path / "merged"
    code, stdout, err = run_cli("--load-dir", str(root), "--method", "linear", "--skip-incomplete",
                                "--save", str(out), "--no-progress-bar")
    assert code == 0, err
    # linear at t = 0, 1/3 (iterations 0, 10 of the window 0..30): w = 1, 2/3.
    assert "coefficients: 0.000000, 0.333333, 0.666667" in stdout
    assert "note: skipped unfinished checkpoint" in stdout and "iter_0000020" in stdout
    prov = json.loads((out / "wsm_merge_provenance.json").read_text())
    skipped = prov["method"]["selection"]["skipped_incomplete"]
    assert [(Path(s["path"]).name, s["iteration"]) for s in skipped] == [("iter_0000020", 20)]
    assert prov["method"]["coefficient_rule"]["positions"] == [0, 10, 30]
    assert any("skipped unfinished checkpoint" in n for n in prov["notes"])
