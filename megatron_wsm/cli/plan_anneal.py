"""``plan_anneal``: fit the annealing loss law to training logs, predict schedules, plan a decay.

Examples::

    # fit a constant-LR run and a WSD run, predict a held-out WSD run (MAPE in the JSON)
    python tools/plan_anneal.py --fit runs/const runs/wsd20 --predict runs/wsd40 \\
        --output-json fit.json --plot fit.png
    # what-if schedules, and the best decay ratio / WSM merge window for a token budget
    python tools/plan_anneal.py --fit runs/const runs/wsd20 \\
        --schedule wsd:ratio=0.3,shape=1-sqrt cosine merge:window=0.2,method=mean \\
        --budget-tokens 2e6 --output-json plan.json

A RUN is a TensorBoard directory written by the trainer (tags ``learning-rate`` and ``lm loss``
or ``validation/lm loss``) or a CSV file with the columns ``step,lr,loss`` (a header line, any
extra columns ignored; an optional ``tokens`` column gives consumed tokens). The law and the fit
live in :mod:`megatron_wsm.annealing`; this module reads logs, prints, writes and plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_wsm import annealing as an
from megatron_wsm import metric_names as names

PROG = "plan_anneal"
EPILOG = """schedules (--schedule KIND[:key=value,...]):
  constant                              the peak LR to the end (stable)
  wsd:ratio=0.2,shape=1-sqrt            WSD decaying over 20 %% of the run (or iters=N);
                                        shapes: linear cosine exponential 1-sqrt
  cosine | linear                       Megatron cosine / linear decay to --min-lr
  merge:window=0.2,method=1-sqrt        WSM merge of the last 20 %% of a stable run (or
                                        window_iters=N), interval=N steps between checkpoints
                                        (default: window / 8), alpha= for ema
examples:
  plan_anneal.py --fit const/ wsd20/ --predict wsd40/ --output-json fit.json --plot fit.png
  plan_anneal.py --fit const.csv wsd20.csv --budget-tokens 1e9 --tokens-per-step 4096
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            f"Fit the annealing loss law {an.LAW} (S1 = LR area, S2 = momentum of LR drops) "
            "to training runs, predict the loss of other schedules and of WSM merges, and "
            "search the decay ratio / merge window with the lowest predicted final loss."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fit", nargs="+", required=True, metavar="RUN", help="runs to fit")
    p.add_argument(
        "--predict",
        nargs="+",
        default=[],
        metavar="RUN",
        help="held-out runs: their LR curve is predicted, and compared (MAPE) when they have "
        "losses",
    )
    p.add_argument(
        "--schedule",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="hypothetical schedules to predict (see below)",
    )
    p.add_argument("--output-json", metavar="F", help="write the fit, predictions and plan here")
    p.add_argument("--plot", metavar="F.png", help="observed vs fitted vs predicted curves")
    g = p.add_argument_group("fit")
    g.add_argument(
        "--loss",
        choices=("train", "valid"),
        default="train",
        help=f"which loss to read from TensorBoard: {names.LM_LOSS!r} (train, default) or "
        f"{names.VALID_LOSS!r} (valid)",
    )
    g.add_argument("--lam", type=float, default=None, help="fix lambda (default: fitted)")
    g.add_argument(
        "--huber-delta",
        type=float,
        default=an.DEFAULT_HUBER_DELTA,
        help="Huber threshold on relative residuals (default %(default)s = 0.5 %%)",
    )
    g.add_argument(
        "--smooth",
        type=int,
        default=None,
        metavar="STEPS",
        help="local-linear smoothing window in steps before fitting and scoring "
        "(default: 5 %% of each run; 1 = raw)",
    )
    g.add_argument(
        "--fit-start",
        type=int,
        default=None,
        metavar="ITER",
        help="first iteration fitted and scored in every run (default: end of warmup)",
    )
    g.add_argument("--starts", type=int, default=4, help="optimiser starts (default 4)")
    g.add_argument(
        "--max-points",
        type=int,
        default=2000,
        help="observations per run used in the fit, thinned evenly (default %(default)s)",
    )
    s = p.add_argument_group("schedules and search (defaults: taken from the first --fit run)")
    s.add_argument("--train-iters", type=int, default=None)
    s.add_argument("--lr", type=float, default=None, help="peak LR")
    s.add_argument("--min-lr", type=float, default=None)
    s.add_argument("--warmup-iters", type=int, default=None)
    s.add_argument(
        "--budget-tokens",
        type=float,
        default=None,
        help="search the WSD decay ratio and WSM merge window for this many training tokens",
    )
    s.add_argument(
        "--tokens-per-step",
        type=float,
        default=None,
        help="tokens per iteration (default: from the runs' token counts)",
    )
    s.add_argument(
        "--search-shapes",
        nargs="+",
        default=["1-sqrt", "linear", "cosine"],
        choices=an.WSD_SHAPES,
        help="WSD shapes searched (default: %(default)s)",
    )
    s.add_argument(
        "--search-methods",
        nargs="+",
        default=["1-sqrt", "mean", "ema"],
        choices=an.MERGE_METHODS,
        help="merge methods searched (default: %(default)s)",
    )
    s.add_argument(
        "--merge-interval",
        type=int,
        default=None,
        metavar="ITERS",
        help="steps between window checkpoints in the merge search (default: window / 8)",
    )
    return p


# --------------------------------------------------------------------------- reading runs


def load_run(path: str, *, loss: str = "train") -> an.Run:
    """Read one run: a TensorBoard event directory (or file) or a ``step,lr,loss`` CSV."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if p.is_dir() or ".tfevents." in p.name:
        return _load_tensorboard(p, loss)
    return _load_csv(p)


def _load_tensorboard(p: Path, loss: str) -> an.Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 = keep every event (the default samples 10,000 per tag).
    acc = EventAccumulator(str(p), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    loss_tag = names.LM_LOSS if loss == "train" else names.VALID_LOSS
    missing = [t for t in (names.LEARNING_RATE, loss_tag) if t not in tags]
    if missing:
        raise ValueError(
            f"{p}: TensorBoard scalars {missing} not found (has: {sorted(tags) or 'none'})"
        )
    lr_ev = acc.Scalars(names.LEARNING_RATE)
    loss_ev = acc.Scalars(loss_tag)
    tps = None
    if names.CONSUMED_TOKENS in tags:
        ev = acc.Scalars(names.CONSUMED_TOKENS)
        tps = _tokens_per_step([e.step for e in ev], [e.value for e in ev])
    elif names.LEARNING_RATE_VS_TOKENS in tags:
        # Written right after "learning-rate" at every logged iteration: pair them in order.
        ev = acc.Scalars(names.LEARNING_RATE_VS_TOKENS)
        n = min(len(ev), len(lr_ev))
        tps = _tokens_per_step([e.step for e in lr_ev[:n]], [e.step for e in ev[:n]])
    return an.Run.from_points(
        _run_name(p),
        [e.step for e in lr_ev],
        [e.value for e in lr_ev],
        [e.step for e in loss_ev],
        [e.value for e in loss_ev],
        loss_lag=1 if loss == "train" else 0,
        tokens_per_step=tps,
    )


def _tokens_per_step(steps: Sequence[int], tokens: Sequence[float]) -> float | None:
    st = np.asarray(steps, dtype=np.float64)
    tk = np.asarray(tokens, dtype=np.float64)
    ok = st > 0
    if not np.any(ok):
        return None
    return float(np.median(tk[ok] / st[ok]))


def _load_csv(p: Path) -> an.Run:
    with open(p, newline="") as fh:
        rows = list(csv.reader(line for line in fh if line.strip() and not line.startswith("#")))
    if not rows:
        raise ValueError(f"{p}: empty CSV")
    header = [h.strip().lower() for h in rows[0]]
    if not {"step", "lr"} <= set(header):
        raise ValueError(f"{p}: the CSV needs a header with columns step,lr[,loss][,tokens]")
    col = {h: i for i, h in enumerate(header)}
    lr_s, lr_v, lo_s, lo_v, tk_s, tk_v = [], [], [], [], [], []
    for n, row in enumerate(rows[1:], start=2):

        def cell(name: str, row: list[str] = row) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        try:
            step = int(float(cell("step")))
            if cell("lr"):
                lr_s.append(step)
                lr_v.append(float(cell("lr")))
            if cell("loss"):
                lo_s.append(step)
                lo_v.append(float(cell("loss")))
            if cell("tokens"):
                tk_s.append(step)
                tk_v.append(float(cell("tokens")))
        except ValueError:
            raise ValueError(f"{p}:{n}: not a number in {row}") from None
    first = min(lr_s + lo_s + tk_s, default=1)
    if first < 0:
        raise ValueError(f"{p}: negative step {first}; steps are iterations (from 1, or from 0)")
    # Runs are 1-based iterations (the trainer's, and what the law's loss_lag assumes). A log
    # whose steps start at 0 counts from 0: its step k is iteration k + 1 (LR of update k + 1,
    # loss before it), so shift every column alike rather than dropping or misplacing step 0.
    shift = 1 if first == 0 else 0
    lr_s, lo_s, tk_s = ([s + shift for s in col] for col in (lr_s, lo_s, tk_s))
    run = an.Run.from_points(
        _run_name(p),
        lr_s,
        lr_v,
        lo_s,
        lo_v,
        tokens_per_step=_tokens_per_step_slope(tk_s, tk_v) if tk_s else None,
    )
    if shift:
        run.notes.insert(0, "steps counted from 0: step k read as iteration k + 1")
    return run


def _tokens_per_step_slope(steps: Sequence[int], tokens: Sequence[float]) -> float | None:
    """Tokens per step from a ``tokens`` column: the median slope between logged rows, which
    does not depend on whether a row's tokens are counted before or after its step; a single
    row falls back to tokens / step."""
    st = np.asarray(steps, dtype=np.float64)
    tk = np.asarray(tokens, dtype=np.float64)
    d_st, d_tk = np.diff(st), np.diff(tk)
    ok = d_st > 0
    if not np.any(ok):
        return _tokens_per_step(steps, tokens)
    return float(np.median(d_tk[ok] / d_st[ok]))


def _run_name(p: Path) -> str:
    p = p.resolve()
    return p.parent.name if ".tfevents." in p.name else (p.stem if p.is_file() else p.name)


def _unique_names(runs: list[an.Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}#{seen[r.name]}"
        else:
            seen[r.name] = 1


# --------------------------------------------------------------------------- schedules


def parse_schedule(spec: str) -> tuple[str, dict[str, str]]:
    """``KIND[:k=v,...]`` -> (kind, options); raises ValueError on bad syntax."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "stable":
        kind = "constant"
    if kind not in ("constant", "wsd", "cosine", "linear", "merge"):
        raise ValueError(
            f"schedule {spec!r}: unknown kind {kind!r} (constant, wsd, cosine, linear, merge)"
        )
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"schedule {spec!r}: expected key=value, got {item!r}")
        opts[key.strip()] = val.strip()
    allowed = {
        "constant": set(),
        "cosine": set(),
        "linear": set(),
        "wsd": {"ratio", "iters", "shape"},
        "merge": {"window", "window_iters", "method", "interval", "alpha", "final_ratio"},
    }[kind]
    extra = set(opts) - allowed
    if extra:
        raise ValueError(
            f"schedule {spec!r}: unknown option(s) {sorted(extra)} for {kind} "
            f"(allowed: {sorted(allowed) or 'none'})"
        )
    return kind, opts


def schedule_lrs(spec: str, template: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The LR curve of a schedule spec on the template (train_iters, lr, min_lr, warmup)."""
    kind, opts = parse_schedule(spec)
    T, lr, min_lr, warm = (
        template["train_iters"],
        template["lr"],
        template["min_lr"],
        template["warmup_iters"],
    )
    info: dict[str, Any] = {"spec": spec, "kind": kind, "train_iters": T}
    if kind in ("constant", "cosine", "linear"):
        style = "stable" if kind == "constant" else kind
        lrs = an.trainer_lr_curve(
            train_iters=T, lr=lr, min_lr=min_lr, warmup_iters=warm, style=style
        )
    elif kind == "wsd":
        shape = opts.get("shape", "1-sqrt")
        if shape not in an.WSD_SHAPES:
            raise ValueError(f"schedule {spec!r}: shape must be one of {an.WSD_SHAPES}")
        n = _length(spec, opts, "iters", "ratio", T)
        lrs = an.trainer_lr_curve(
            train_iters=T,
            lr=lr,
            min_lr=min_lr,
            warmup_iters=warm,
            style="WSD",
            wsd_decay_iters=n,
            wsd_shape=shape,
        )
        info.update(shape=shape, decay_iters=n, ratio=n / T)
    else:
        method = opts.get("method", "1-sqrt")
        win = _length(spec, opts, "window_iters", "window", T)
        interval = int(opts["interval"]) if "interval" in opts else None
        kw = {k: float(opts[k]) for k in ("alpha", "final_ratio") if k in opts}
        base = an.trainer_lr_curve(train_iters=T, lr=lr, warmup_iters=warm, style="stable")
        lrs = an.merge_lrs(base, win, method, interval=interval, **kw)
        step = interval or max(1, int(round(win / 8)))
        info.update(
            method=method,
            window_iters=win,
            fraction=win / T,
            interval=step,
            n_checkpoints=win // step + 1,
        )
    return lrs, info


def _length(spec: str, opts: dict[str, str], iters_key: str, ratio_key: str, T: int) -> int:
    if iters_key in opts:
        n = int(opts[iters_key])
    elif ratio_key in opts:
        n = int(round(float(opts[ratio_key]) * T))
    else:
        raise ValueError(f"schedule {spec!r}: give {ratio_key}= (fraction) or {iters_key}=")
    if not 1 <= n <= T:
        raise ValueError(f"schedule {spec!r}: length {n} outside 1..{T} iterations")
    return n


def _template(args: argparse.Namespace, runs: list[an.Run], train_iters: int) -> dict[str, Any]:
    """Peak LR, min LR and warmup of new schedules: flags, else the first fit run's."""
    ref = runs[0]
    after_peak = np.concatenate([r.lrs[an.peak_index(r.lrs) :] for r in runs])
    return {
        "train_iters": int(train_iters),
        "lr": args.lr if args.lr is not None else float(ref.lrs.max()),
        # The lowest LR any run decayed to, e.g. the --min-lr of a WSD run.
        "min_lr": args.min_lr if args.min_lr is not None else float(after_peak.min()),
        "warmup_iters": (
            args.warmup_iters if args.warmup_iters is not None else an.peak_index(ref.lrs)
        ),
    }


# --------------------------------------------------------------------------- output


def _fmt_row(cols: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(
        str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cols, widths))
    ).rstrip()


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of a report (the JSON written by --output-json)."""
    p = report["params"]
    fe = report["fit_error"]
    lines = [
        f"law: {report['law']}",
        "  S1 = sum of LR over steps; S2 = sum of m_i, m_i = lam*m_(i-1) + (lr_(i-1) - lr_i)",
        "params: "
        + "  ".join(f"{k}={p[k]:.6g}" for k in ("L0", "A", "alpha", "C", "lam"))
        + ("  (lam fixed)" if report["lam_fixed"] else ""),
        f"fit error: MAPE {fe['mape']:.3f} %  RMSE {fe['rmse']:.4f}  "
        f"(Huber delta {report['huber_delta']:g}, smoothing {report['smooth_window']} steps, "
        f"{report['n_starts']} starts, {report['n_evals']} evaluations)",
        "",
    ]
    rows: list[tuple[str, ...]] = []
    for role, entries in (("fit", report["fit_runs"]), ("predict", report["predict"])):
        for r in entries:
            if "mape" in r:
                rows.append(
                    (
                        role,
                        r["name"],
                        f"{r['first_step']}-{r['last_step']}",
                        f"{r['mape']:.3f}",
                        f"{r['mape_raw']:.3f}",
                        f"{r['noise_mape']:.3f}",
                        f"{r['final_observed']:.4f}",
                        f"{r['final_predicted']:.4f}",
                    )
                )
            else:
                rows.append(
                    (
                        role,
                        r["name"],
                        f"1-{r['train_iters']}",
                        "-",
                        "-",
                        "-",
                        "-",
                        f"{r['final_predicted']:.4f}",
                    )
                )
    for sc in report["schedules"]:
        rows.append(
            (
                "schedule",
                sc["spec"],
                f"1-{sc['train_iters']}",
                "-",
                "-",
                "-",
                "-",
                f"{sc['final_loss']:.4f}",
            )
        )
    head = ("role", "run", "steps", "MAPE %", "raw MAPE %", "noise %", "final obs", "final pred")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines += [_fmt_row(head, widths)] + [_fmt_row(r, widths) for r in rows]
    lines.append(
        "(MAPE vs the smoothed loss; raw MAPE vs the logged loss; noise = smoothed vs logged, "
        "the floor of raw MAPE; final pred of a schedule = loss after its last update)"
    )
    search = report.get("search")
    if search:
        lines += [
            "",
            f"search: budget {search['budget_tokens']:.4g} tokens = {search['train_iters']} "
            f"iterations at {search['tokens_per_step']:.6g} tokens/step; constant LR -> "
            f"{search['constant_final_loss']:.4f}",
        ]
        bw, bm = search["best_wsd"], search["best_merge"]
        lines.append(
            f"  best WSD:   shape {bw['shape']}, decay ratio {bw['ratio']:.3f} "
            f"({bw['decay_iters']} iters) -> {bw['final_loss']:.4f}"
        )
        lines.append(
            f"  best merge: method {bm['method']}, window {bm['fraction']:.3f} "
            f"({bm['window_iters']} iters, {bm['n_checkpoints']} checkpoints every "
            f"{bm['interval']}) -> {bm['final_loss']:.4f}"
        )
        for key in ("wsd", "merge"):
            top = search[key][:5]
            lines.append(
                f"  top {key}: "
                + "; ".join(
                    f"{c.get('shape', c.get('method'))} {c.get('ratio', c.get('fraction')):.3f} "
                    f"{c['final_loss']:.4f}"
                    for c in top
                )
            )
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plot(report: dict[str, Any], curves: dict[str, Any], path: str, dpi: int = 100) -> None:
    """Observed (smoothed and raw) vs fitted vs predicted losses, a zoom on the end, the LRs."""
    # Figure + Agg canvas rather than pyplot: no global backend state, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([["loss", "zoom"], ["lr", "lr"]], height_ratios=(3, 1.1))
    ax, zoom, ax_lr = axes["loss"], axes["zoom"], axes["lr"]
    last = max(int(c["lrs"].size) for c in curves["runs"])
    # The zoom shows the last 45 % of the steps: where decays and merges differ.
    z0 = int(0.55 * last)
    colors = iter([f"C{i}" for i in range(10)] * 10)
    lims: dict[str, list[float]] = {"loss": [], "zoom": []}
    for c in curves["runs"]:
        color = next(colors)
        role = c["role"]
        st, pred = c["steps"], c["predicted"]
        for name, a in (("loss", ax), ("zoom", zoom)):
            sel = st >= (z0 if name == "zoom" else 0)
            label = name == "loss"
            if c.get("observed") is not None:
                raw, obs = c["raw"][sel], c["observed"][sel]
                a.plot(st[sel], raw, color=color, alpha=0.12, lw=0.6)
                a.plot(
                    st[sel],
                    obs,
                    color=color,
                    lw=1.2,
                    alpha=0.8,
                    label=f"{c['name']} observed ({role})" if label else None,
                )
                # Fitted: dotted; predicted (held out): dashed; both in the run's colour.
                tag = "fitted" if role == "fit" else f"predicted, MAPE {c['mape']:.2f} %"
                a.plot(
                    st[sel],
                    pred[sel],
                    color=color,
                    ls=":" if role == "fit" else "--",
                    lw=2.0,
                    label=f"{c['name']} {tag}" if label else None,
                )
                lims[name] += [float(obs.min()), float(obs.max())] if obs.size else []
            else:
                a.plot(
                    st[sel],
                    pred[sel],
                    color=color,
                    ls="-.",
                    lw=1.4,
                    label=f"{c['name']} ({role})" if label else None,
                )
                if c.get("merge"):  # the merged model exists only at the end
                    a.plot([st[-1]], [c["final"]], marker="*", ms=12, color=color, ls="none")
            fin = pred[sel][np.isfinite(pred[sel])]
            lims[name] += [float(fin.min()), float(fin.max())] if fin.size else []
        ax_lr.plot(np.arange(1, c["lrs"].size + 1), c["lrs"], color=color, lw=1.2)
    for name, a in (("loss", ax), ("zoom", zoom)):
        if lims[name]:
            lo, hi = min(lims[name]), max(lims[name])
            pad = 0.05 * (hi - lo + 1e-9)
            a.set_ylim(lo - pad, hi + pad)
        a.grid(alpha=0.3)
        a.set_xlabel("iteration")
    p = report["params"]
    fig.suptitle(
        f"{report['law']}:  L0={p['L0']:.4g}  A={p['A']:.4g}  alpha={p['alpha']:.4g}  "
        f"C={p['C']:.4g}  lam={p['lam']:.5g};  fit MAPE {report['fit_error']['mape']:.2f} %",
        fontsize=11,
    )
    ax.set_title("loss (smoothed; raw faint)", fontsize=10)
    zoom.set_title(f"zoom: iterations {z0}-{last}", fontsize=10)
    ax.legend(fontsize=8, ncol=1 if len(curves["runs"]) < 4 else 2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})


def _curve(
    role: str,
    name: str,
    lrs: np.ndarray,
    fit: an.RunFit | None = None,
    pred: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> dict[str, Any]:
    if fit is not None:
        return {
            "role": role,
            "name": name,
            "lrs": lrs,
            "steps": fit.steps,
            "observed": fit.observed,
            "raw": fit.raw,
            "predicted": fit.predicted,
            "mape": fit.mape,
        }
    return {"role": role, "name": name, "lrs": lrs, "steps": steps, "predicted": pred}


def _curve_steps(lrs: np.ndarray, fit_start: int | None) -> np.ndarray:
    """Iterations at which to draw a predicted training-loss curve: from the fit start on."""
    start = fit_start if fit_start is not None else an.default_fit_start(an.Run("curve", lrs))
    # The law needs some LR area before the point (S1 > 0).
    first_area = int(np.argmax(lrs > 0)) + 2
    start = min(max(start, first_area), lrs.size)
    return np.arange(start, lrs.size + 1)


# --------------------------------------------------------------------------- main


def _budget_iters(args: argparse.Namespace, fit_runs: list[an.Run]) -> tuple[int, float | None]:
    """Iterations of new schedules (budget, --train-iters or the longest fit run), tokens/step."""
    tps = args.tokens_per_step
    if tps is None:
        tps = next((r.tokens_per_step for r in fit_runs if r.tokens_per_step), None)
    T = args.train_iters
    if args.budget_tokens is not None:
        if not tps:
            raise ValueError(
                "--budget-tokens needs tokens per step: none found in the runs' logs "
                f"({names.CONSUMED_TOKENS!r} / {names.LEARNING_RATE_VS_TOKENS!r} tags, or a "
                "CSV 'tokens' column); pass --tokens-per-step"
            )
        T = int(args.budget_tokens // tps)
        if T < 2:
            raise ValueError(f"--budget-tokens {args.budget_tokens:g} is under 2 iterations")
    return int(T or max(r.lrs.size for r in fit_runs)), tps


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Do the work; returns (report for JSON/table, curves for the plot)."""
    fit_runs = [load_run(p, loss=args.loss) for p in args.fit]
    pred_runs = [load_run(p, loss=args.loss) for p in args.predict]
    _unique_names(fit_runs + pred_runs)
    paths = {r.name: p for r, p in zip(fit_runs + pred_runs, args.fit + args.predict)}
    # Everything that can be wrong with the request is checked before the (slower) fit.
    T, tps = _budget_iters(args, fit_runs)
    template = _template(args, fit_runs, T)
    schedules = [(spec, *schedule_lrs(spec, template)) for spec in args.schedule]

    result = an.fit_law(
        fit_runs,
        lam=args.lam,
        huber_delta=args.huber_delta,
        smooth_window=args.smooth,
        fit_start=args.fit_start,
        n_starts=args.starts,
        max_points=args.max_points,
    )
    params = result.params
    report: dict[str, Any] = result.to_json()
    report["fit_runs"] = report.pop("runs")
    for r in report["fit_runs"]:
        r["path"] = paths[r["name"]]
    report["definitions"] = {
        "S1": "sum over steps of the LR (forward area)",
        "S2": "sum over steps of m_i = lam*m_(i-1) + (lr_(i-1) - lr_i), drops counted from the "
        "first step at peak LR",
        "step": "optimizer iteration; training loss at iteration s sees s-1 updates",
        "mape": "percent, vs the smoothed observed loss from the fit start on; mape_raw vs the "
        "logged loss; noise_mape: smoothed vs logged (the floor of mape_raw)",
    }
    warnings = list(report.pop("warnings"))
    for r in fit_runs + pred_runs:
        warnings += [f"{r.name}: {n}" for n in r.notes]
    curves: dict[str, Any] = {"runs": []}
    for r, f in zip(fit_runs, result.runs):
        curves["runs"].append(_curve("fit", r.name, r.lrs, fit=f))

    report["predict"] = []
    for r in pred_runs:
        entry: dict[str, Any] = {"name": r.name, "path": paths[r.name]}
        if r.has_loss:
            ev = an.evaluate(params, r, smooth_window=args.smooth, start=args.fit_start)
            entry.update(ev.to_json())
            curves["runs"].append(_curve("predict", r.name, r.lrs, fit=ev))
        else:
            steps = _curve_steps(r.lrs, args.fit_start)
            pred = an.predict_loss(params, r.lrs, steps, loss_lag=1)
            entry.update(train_iters=int(r.lrs.size), final_predicted=an.final_loss(params, r.lrs))
            curves["runs"].append(_curve("predict", r.name, r.lrs, pred=pred, steps=steps))
        report["predict"].append(entry)

    longest = max(r.lrs.size for r in fit_runs)
    report["template"] = dict(template, tokens_per_step=tps)
    if T > 2 * longest:
        warnings.append(
            f"predicting {T} iterations, {T / longest:.1f}x the longest fitted run: extrapolation"
        )

    report["schedules"] = []
    for spec, lrs, info in schedules:
        info["final_loss"] = an.final_loss(params, lrs)
        report["schedules"].append(info)
        steps = _curve_steps(lrs, args.fit_start)
        curves["runs"].append(
            dict(
                _curve(
                    "schedule", spec, lrs, pred=an.predict_loss(params, lrs, steps), steps=steps
                ),
                merge=info["kind"] == "merge",
                final=info["final_loss"],
            )
        )

    if args.budget_tokens is not None:
        assert tps is not None
        common = dict(train_iters=T, lr=template["lr"], warmup_iters=template["warmup_iters"])
        wsd = an.search_decay_ratio(
            params, min_lr=template["min_lr"], shapes=args.search_shapes, **common
        )
        merge = an.search_merge_window(
            params, methods=args.search_methods, interval=args.merge_interval, **common
        )
        const = an.trainer_lr_curve(style="stable", **common)
        for cands, key, what in ((wsd, "ratio", "decay ratio"), (merge, "fraction", "window")):
            values = [c[key] for c in cands]
            if cands[0][key] in (min(values), max(values)):
                warnings.append(
                    f"the best {what} ({cands[0][key]:.3f}) is at the edge of the searched range "
                    f"({min(values):.3f}-{max(values):.3f}): the law favours it beyond what the "
                    "fitted runs show; check it with a run"
                )
        report["search"] = {
            "budget_tokens": float(args.budget_tokens),
            "tokens_per_step": float(tps),
            "train_iters": T,
            "constant_final_loss": an.final_loss(params, const),
            "best_wsd": wsd[0],
            "best_merge": merge[0],
            "wsd": wsd,
            "merge": merge,
        }
    report["warnings"] = warnings
    return report, curves


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input or unidentifiable, 1 I/O)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report, curves = run(args)
    except an.IdentificationError as exc:
        print(f"{PROG}: cannot fit: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    for target, writer in (
        (args.output_json, lambda f: _write_json(report, f)),
        (args.plot, lambda f: plot(report, curves, f)),
    ):
        if not target:
            continue
        try:
            parent = os.path.dirname(os.path.abspath(target))
            os.makedirs(parent, exist_ok=True)
            writer(target)
        except OSError as exc:
            print(f"{PROG}: error: cannot write {target!r}: {exc}", file=sys.stderr)
            return 1
        print(f"{PROG}: wrote {target}", file=sys.stderr)
    return 0


def _write_json(report: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
