"""Tests of the annealing law, its fit and the planner CLI (megatron_wsm.annealing, plan_anneal).

Synthetic runs are generated from the law itself with multiplicative Gaussian noise, so the
truth is known: the fit must recover the parameters within the tolerances below and predict
held-out schedules within 1 % MAPE. Tolerances (relative unless said): L0 ± 0.1 absolute,
A, alpha, C ± 10 %, log10(1 - lam) ± 0.15 — from runs of 1,500 steps with 1 % noise per step;
the fit lands well inside them (about 2 % off at worst: alpha).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from megatron_wsm import annealing as an
from megatron_wsm import metric_names as names
from megatron_wsm.annealing.logs import load_run
from megatron_wsm.cli.plan_anneal import main

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plan_anneal.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRUE = an.LawParams(L0=2.5, A=1.6, alpha=0.55, C=1.2, lam=0.995)
T, PEAK, MIN_LR, WARMUP = 1500, 3e-3, 3e-5, 50


def lrs_of(style: str = "stable", train_iters: int = T, **kw) -> np.ndarray:
    return an.trainer_lr_curve(
        train_iters=train_iters, lr=PEAK, min_lr=MIN_LR, warmup_iters=WARMUP, style=style, **kw
    )


def synth_run(
    name: str,
    lrs: np.ndarray,
    seed: int,
    *,
    noise: float = 0.01,
    params: an.LawParams = TRUE,
    spikes: float = 0.0,
) -> an.Run:
    """A run whose training loss follows the law, times (1 + noise·N(0,1)), maybe with spikes."""
    rng = np.random.default_rng(seed)
    steps = np.arange(3, lrs.size + 1)  # S1 > 0 from iteration 3 (the LR of iteration 1 is 0)
    loss = an.predict_loss(params, lrs, steps) * (1 + noise * rng.standard_normal(steps.size))
    if spikes:
        loss[rng.random(steps.size) < spikes] *= 1.3
    return an.Run(name, lrs, steps, loss)


@pytest.fixture(scope="module")
def runs() -> dict[str, an.Run]:
    return {
        "const": synth_run("const", lrs_of("stable"), 1),
        "wsd20": synth_run("wsd20", lrs_of("WSD", wsd_decay_iters=300), 2),
        "wsd40": synth_run("wsd40", lrs_of("WSD", wsd_decay_iters=600), 3),
        "cosine": synth_run("cosine", lrs_of("cosine"), 4),
    }


@pytest.fixture(scope="module")
def fitted(runs) -> an.FitResult:
    return an.fit_law([runs["const"], runs["wsd20"]], max_points=400)


def assert_recovered(p: an.LawParams, truth: an.LawParams = TRUE) -> None:
    assert p.L0 == pytest.approx(truth.L0, abs=0.1)
    assert p.A == pytest.approx(truth.A, rel=0.1)
    assert p.alpha == pytest.approx(truth.alpha, rel=0.1)
    assert p.C == pytest.approx(truth.C, rel=0.1)
    assert math.log10(1 - p.lam) == pytest.approx(math.log10(1 - truth.lam), abs=0.15)


# --------------------------------------------------------------------------- the law


def naive_s2(lrs: np.ndarray, lam: float) -> np.ndarray:
    """The definition, step by step: m_i = lam m_(i-1) + drop_i, from the first peak step on."""
    peak = int(np.argmax(lrs >= lrs.max()))
    m = s2 = 0.0
    out = []
    for i, lr in enumerate(lrs):
        drop = lrs[i - 1] - lr if i > peak else 0.0
        m = lam * m + drop
        s2 += m
        out.append(s2)
    return np.array(out)


@pytest.mark.parametrize("lam", [0.5, 0.9, 0.999, 0.9999])
def test_annealing_area_matches_definition(lam: float) -> None:
    rng = np.random.default_rng(0)
    # Warmup, plateau, a noisy decay with a re-warming bump: every branch of the recursion,
    # and long enough (5,000 steps) to span many vectorisation blocks at small lam.
    lrs = np.concatenate(
        [
            np.linspace(0, 1e-3, 50),
            np.full(1000, 1e-3),
            np.linspace(1e-3, 2e-4, 3000) + 1e-5 * rng.standard_normal(3000),
            np.full(200, 5e-4),
            np.linspace(5e-4, 0, 750),
        ]
    )
    np.testing.assert_allclose(
        an.annealing_area(lrs, lam), naive_s2(lrs, lam), rtol=1e-9, atol=1e-15
    )


def test_areas_and_loss_timing() -> None:
    lrs = np.array([0.0, 1.0, 2.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(an.forward_area(lrs), [0, 1, 3, 5, 6, 6.5])
    # Warmup rises are not annealing; drops count from the peak (index 2) on.
    np.testing.assert_allclose(an.annealing_area(lrs, 0.5), [0, 0, 0, 0, 1, 2.0])
    p = an.LawParams(L0=1.0, A=1.0, alpha=1.0, C=0.1, lam=0.5)
    # Training loss at iteration s sees s - 1 updates (lag 1); the final loss sees all.
    assert an.predict_loss(p, lrs, [4])[0] == pytest.approx(1 + 1 / 3)
    assert an.predict_loss(p, lrs, [4], loss_lag=0)[0] == pytest.approx(1 + 1 / 5)
    assert an.final_loss(p, lrs) == pytest.approx(1 + 1 / 6.5 - 0.1 * 2.0)
    assert an.warmup_end_step(lrs) == 3


def test_trainer_lr_curve_matches_megatron_scheduler() -> None:
    from megatron_wsm.config import OptimizerSettings
    from megatron_wsm.lr import lr_curve

    cases = [
        dict(lr_decay_style="stable"),
        dict(lr_decay_style="cosine"),
        dict(lr_decay_style="linear", lr_decay_iters=150),
        dict(lr_decay_style="inverse-square-root"),
    ] + [
        dict(lr_decay_style="WSD", lr_wsd_decay_style=s, lr_wsd_decay_iters=60)
        for s in an.WSD_SHAPES
    ]
    for case in cases:
        opt = OptimizerSettings(lr=3e-3, min_lr=3e-5, lr_warmup_iters=20, **case)
        ref = np.array(lr_curve(opt, 200, 8))
        ours = an.trainer_lr_curve(
            train_iters=200,
            lr=opt.lr,
            min_lr=opt.min_lr,
            warmup_iters=opt.lr_warmup_iters,
            style=opt.lr_decay_style,
            decay_iters=opt.lr_decay_iters,
            wsd_decay_iters=opt.lr_wsd_decay_iters,
            wsd_shape=opt.lr_wsd_decay_style,
            global_batch_size=8,
        )
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0, err_msg=str(case))


def test_merge_emulates_decay() -> None:
    base = lrs_of("stable", train_iters=400)
    # A checkpoint every step, 1-sqrt coefficients == the trainer's WSD 1-sqrt decay to 0.
    merged = an.merge_lrs(base, 100, "1-sqrt", interval=1)
    wsd = an.trainer_lr_curve(
        train_iters=400, lr=PEAK, warmup_iters=WARMUP, style="WSD", wsd_decay_iters=100
    )
    np.testing.assert_allclose(merged, wsd, rtol=1e-12)
    assert an.final_loss(TRUE, merged) == pytest.approx(an.final_loss(TRUE, wsd), rel=1e-12)
    # Coarser: 4 checkpoints 25 steps apart, piecewise-constant w_i = f((i-1)/4).
    coarse = an.merge_lrs(base, 100, "1-sqrt", interval=25)
    np.testing.assert_allclose(
        coarse[300:].reshape(4, 25),
        PEAK * np.array([[1, 1 - 0.5, 1 - 0.5**0.5, 1 - 0.75**0.5]]).T * np.ones((1, 25)),
    )
    # One checkpoint (k = 1) is no merge at all: the stable run's own loss.
    assert an.final_loss(TRUE, an.merge_lrs(base, 100, "mean", interval=100)) == pytest.approx(
        an.final_loss(TRUE, base)
    )
    with pytest.raises(ValueError, match="whole number of intervals"):
        an.merge_lrs(base, 100, "mean", interval=30)


def test_smooth_is_unbiased_on_lines_and_robust_to_spikes() -> None:
    steps = np.arange(1, 501)
    line = 5.0 - 0.002 * steps
    np.testing.assert_allclose(an.smooth(steps, line, 31), line, atol=1e-12)
    rng = np.random.default_rng(0)
    noisy = line + 0.05 * rng.standard_normal(500)
    noisy[::50] += 2.0  # spikes
    err = an.smooth(steps, noisy, 31) - line
    assert np.abs(err).max() < 0.05 and np.abs(err).mean() < 0.015
    np.testing.assert_array_equal(an.smooth(steps, noisy, 1), noisy)


# --------------------------------------------------------------------------- fit


def test_fit_recovers_parameters_and_predicts_held_out(runs, fitted) -> None:
    assert_recovered(fitted.params)
    assert fitted.mape < 0.3 and not fitted.warnings
    assert fitted.n_starts >= 2
    for name in ("wsd40", "cosine"):
        ev = an.evaluate(fitted.params, runs[name])
        assert ev.mape < 1.0, (name, ev.mape)
        truth = an.predict_loss(TRUE, runs[name].lrs, ev.steps)
        assert an.mape(ev.predicted, truth) < 1.0
    # Final losses of unseen schedules within 0.5 % of the truth.
    for lrs in (lrs_of("WSD", wsd_decay_iters=600, wsd_shape="linear"), lrs_of("linear")):
        assert an.final_loss(fitted.params, lrs) == pytest.approx(
            an.final_loss(TRUE, lrs), rel=5e-3
        )


def test_fit_with_fixed_lam_and_spikes() -> None:
    spiky = [
        synth_run("const", lrs_of("stable"), 11, spikes=0.02),
        synth_run("wsd20", lrs_of("WSD", wsd_decay_iters=300), 12, spikes=0.02),
    ]
    res = an.fit_law(spiky, lam=TRUE.lam, max_points=400)
    assert res.lam_fixed and res.params.lam == TRUE.lam
    assert_recovered(res.params)


def test_single_wsd_run_is_enough() -> None:
    res = an.fit_law([synth_run("wsd20", lrs_of("WSD", wsd_decay_iters=300), 5)], max_points=400)
    assert_recovered(res.params)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("constant_only", "no fitted run decays its learning rate"),
        ("two_constant_peaks", "no fitted run decays its learning rate"),
        ("no_loss", "no loss values"),
        ("too_few", "only .* loss values"),
        ("narrow_area", "power law in S1"),
    ],
)
def test_refuses_unidentifiable_logs(case: str, match: str) -> None:
    const = synth_run("const", lrs_of("stable"), 1)
    if case == "constant_only":
        fit_runs, kw = [const], {}
    elif case == "two_constant_peaks":
        other = synth_run("const2", 0.5 * lrs_of("stable"), 2)
        fit_runs, kw = [const, other], {}
    elif case == "no_loss":
        fit_runs, kw = [an.Run("lr-only", lrs_of("WSD", wsd_decay_iters=300))], {}
    elif case == "too_few":
        wsd = synth_run("wsd", lrs_of("WSD", wsd_decay_iters=300), 3)
        fit_runs, kw = [wsd], {"fit_start": T - 5}
    else:
        wsd = synth_run("wsd", lrs_of("WSD", wsd_decay_iters=300), 3)
        fit_runs, kw = [wsd], {"fit_start": 900}
    with pytest.raises(an.IdentificationError, match=match):
        an.fit_law(fit_runs, **kw)


def test_search_prefers_an_interior_decay(fitted) -> None:
    common = dict(train_iters=T, lr=PEAK, warmup_iters=WARMUP)
    wsd = an.search_decay_ratio(fitted.params, min_lr=MIN_LR, shapes=["1-sqrt", "linear"], **common)
    losses = [c["final_loss"] for c in wsd]
    assert losses == sorted(losses)
    const = an.final_loss(fitted.params, an.trainer_lr_curve(style="stable", **common))
    best = wsd[0]
    assert best["final_loss"] < const and 0.025 < best["ratio"] < 0.6
    # The same optimum as brute force on the true law (within one grid step).
    truth = an.search_decay_ratio(TRUE, min_lr=MIN_LR, shapes=["1-sqrt", "linear"], **common)
    assert (best["shape"], best["ratio"]) == (
        truth[0]["shape"],
        pytest.approx(truth[0]["ratio"], abs=0.026),
    )
    merge = an.search_merge_window(fitted.params, methods=["1-sqrt", "mean"], **common)
    assert merge[0]["final_loss"] < const
    assert all(c["window_iters"] % c["interval"] == 0 for c in merge)


# --------------------------------------------------------------------------- CLI


def write_csv(path: Path, run: an.Run, *, tokens_per_step: int | None = None) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "lr", "loss"] + (["tokens"] if tokens_per_step else []))
        losses = dict(zip(run.steps.tolist(), run.loss.tolist()))
        for i, lr in enumerate(run.lrs, start=1):
            row = [i, repr(float(lr)), repr(losses[i]) if i in losses else ""]
            w.writerow(row + ([i * tokens_per_step] if tokens_per_step else []))
    return path


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 400


def test_cli_end_to_end_on_csv(runs, tmp_path: Path, capsys) -> None:
    fit = [
        write_csv(tmp_path / f"{n}.csv", runs[n], tokens_per_step=4096) for n in ("const", "wsd20")
    ]
    held = write_csv(tmp_path / "wsd40.csv", runs["wsd40"])
    lr_only = tmp_path / "cos_lr.csv"
    lr_only.write_text(
        "step,lr\n" + "".join(f"{i},{float(lr)!r}\n" for i, lr in enumerate(lrs_of("cosine"), 1))
    )
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(
        [
            "--fit",
            *map(str, fit),
            "--predict",
            str(held),
            str(lr_only),
            "--schedule",
            "wsd:ratio=0.3,shape=linear",
            "merge:window=0.2,method=mean,interval=30",
            "--budget-tokens",
            str(T * 4096),
            "--output-json",
            str(out),
            "--plot",
            str(png),
            "--max-points",
            "400",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    for word in ("law:", "alpha=", "wsd40", "cos_lr", "best WSD", "best merge"):
        assert word in stdout
    report = json.loads(out.read_text())
    assert_recovered(an.LawParams.from_json(report["params"]))
    pred = {p["name"]: p for p in report["predict"]}
    assert pred["wsd40"]["mape"] < 1.0
    assert "mape" not in pred["cos_lr"] and pred["cos_lr"]["final_predicted"] > 0
    assert report["fit_error"]["mape"] < 0.3
    sched = report["schedules"]
    assert [s["kind"] for s in sched] == ["wsd", "merge"]
    assert sched[1]["n_checkpoints"] == 11 and sched[1]["window_iters"] == 300
    search = report["search"]
    assert search["tokens_per_step"] == 4096 and search["train_iters"] == T
    assert search["best_wsd"]["final_loss"] <= min(c["final_loss"] for c in search["wsd"])
    assert_valid_png(png)


def test_cli_predict_start_scores_only_the_branch(runs, tmp_path: Path) -> None:
    """A decay branched off a fitted stable run shares its curve up to the branch point: with
    --predict-start only the branch itself is scored as a prediction."""
    fit = [str(write_csv(tmp_path / f"{n}.csv", runs[n])) for n in ("const", "wsd20")]
    held = str(write_csv(tmp_path / "wsd40.csv", runs["wsd40"]))
    branch_at = int(T * 0.6)
    out = tmp_path / "p.json"
    assert main(["--fit", *fit, "--predict", held, "--predict-start", str(branch_at + 1),
                 "--output-json", str(out)]) == 0
    entry = json.loads(out.read_text())["predict"][0]
    assert entry["first_step"] == branch_at + 1 and entry["last_step"] == T
    assert entry["n_points"] == T - branch_at
    report = json.loads(out.read_text())
    assert report["fit_runs"][0]["first_step"] < branch_at  # the fit keeps its own range


def test_run_names_skip_the_tensorboard_folder(tmp_path: Path) -> None:
    from megatron_wsm.annealing.logs import _run_name

    (tmp_path / "const" / "tb").mkdir(parents=True)
    (tmp_path / "wsd20").symlink_to(tmp_path / "const" / "tb")
    events = tmp_path / "const" / "tb" / "events.out.tfevents.1.host"
    events.write_bytes(b"")
    assert _run_name(tmp_path / "const" / "tb") == "const"
    assert _run_name(events) == "const"
    assert _run_name(tmp_path / "wsd20") == "wsd20"  # a symlink is named by itself
    assert _run_name(tmp_path / "const") == "const"


def test_cli_reads_tensorboard(tmp_path: Path, capsys) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tokens_per_step = 1024
    for name, lrs, seed in (
        ("const", lrs_of("stable", train_iters=600), 1),
        ("wsd", lrs_of("WSD", train_iters=600, wsd_decay_iters=150), 2),
    ):
        run = synth_run(name, lrs, seed)
        losses = dict(zip(run.steps.tolist(), run.loss.tolist()))
        with SummaryWriter(str(tmp_path / name)) as w:
            for it, lr in enumerate(lrs, start=1):
                tokens = it * tokens_per_step
                if it in losses:
                    w.add_scalar(names.LM_LOSS, losses[it], it)
                    w.add_scalar(names.LM_LOSS_VS_TOKENS, losses[it], tokens)
                w.add_scalar(names.LEARNING_RATE, lr, it)
                w.add_scalar(names.LEARNING_RATE_VS_TOKENS, lr, tokens)
    out = tmp_path / "tb.json"
    rc = main(
        [
            "--fit",
            str(tmp_path / "const"),
            str(tmp_path / "wsd"),
            "--budget-tokens",
            "1e6",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    # Tokens per step from the "... vs tokens" tags (their steps are token counts: exact).
    assert report["search"]["tokens_per_step"] == tokens_per_step
    assert report["search"]["train_iters"] == int(1e6 // tokens_per_step)
    assert report["fit_error"]["mape"] < 0.5
    assert report["params"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.25)


def test_cli_refuses_constant_only(runs, tmp_path: Path, capsys) -> None:
    const = write_csv(tmp_path / "const.csv", runs["const"])
    out = tmp_path / "x.json"
    assert main(["--fit", str(const), "--output-json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot fit" in err and "decay" in err
    assert not out.exists()


def test_cli_bad_inputs(runs, tmp_path: Path, capsys) -> None:
    fit = [str(write_csv(tmp_path / f"{n}.csv", runs[n])) for n in ("const", "wsd20")]
    assert main(["--fit", str(tmp_path / "missing.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--fit", *fit, "--budget-tokens", "1e6"]) == 2
    assert "tokens per step" in capsys.readouterr().err
    assert main(["--fit", *fit, "--schedule", "wsd:shape=1-sqrt"]) == 2
    assert "ratio=" in capsys.readouterr().err
    assert main(["--fit", *fit, "--schedule", "step:3"]) == 2
    assert "unknown kind" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("iteration,loss\n1,2\n")
    assert main(["--fit", str(tmp_path / "bad.csv")]) == 2
    assert "header" in capsys.readouterr().err


def test_tool_wrapper_runs_from_anywhere(tmp_path: Path) -> None:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--budget-tokens" in proc.stdout and "merge:window=0.2" in proc.stdout


def _shift_csv_steps(src: Path, dst: Path, by: int) -> Path:
    rows = list(csv.reader(src.read_text().splitlines()))
    with open(dst, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rows[0])
        for row in rows[1:]:
            w.writerow([int(row[0]) + by, *row[1:]])
    return dst


def test_csv_with_steps_from_zero_is_the_same_run(runs, tmp_path: Path) -> None:
    # A logger counting steps from 0 writes step k for the trainer's iteration k + 1.
    one_based = write_csv(tmp_path / "wsd20.csv", runs["wsd20"], tokens_per_step=4096)
    zero_based = _shift_csv_steps(one_based, tmp_path / "wsd20_0.csv", -1)
    assert zero_based.read_text().splitlines()[1].startswith("0,")
    ref, run = load_run(str(one_based)), load_run(str(zero_based))
    np.testing.assert_array_equal(run.lrs, ref.lrs)
    np.testing.assert_array_equal(run.steps, ref.steps)
    np.testing.assert_array_equal(run.loss, ref.loss)
    assert run.tokens_per_step == ref.tokens_per_step == 4096
    assert any("from 0" in n for n in run.notes)
    assert not any("from 0" in n for n in ref.notes)


def test_csv_with_negative_steps_is_refused(runs, tmp_path: Path) -> None:
    csv_path = _shift_csv_steps(write_csv(tmp_path / "c.csv", runs["const"]), tmp_path / "n.csv",
                                -2)
    with pytest.raises(ValueError, match="negative step"):
        load_run(str(csv_path))
