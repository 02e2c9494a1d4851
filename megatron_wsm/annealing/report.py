"""Output of the planner: the text table of a report and the loss/LR plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_wsm.annealing.fit import RunFit
from megatron_wsm.annealing.runs import Run, default_fit_start


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


def curve(
    role: str,
    name: str,
    lrs: np.ndarray,
    fit: RunFit | None = None,
    pred: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> dict[str, Any]:
    """One curve of the plot: observed/fitted when ``fit`` is given, else predicted only."""
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


def curve_steps(lrs: np.ndarray, fit_start: int | None) -> np.ndarray:
    """Iterations at which to draw a predicted training-loss curve: from the fit start on."""
    start = fit_start if fit_start is not None else default_fit_start(Run("curve", lrs))
    # The law needs some LR area before the point (S1 > 0).
    first_area = int(np.argmax(lrs > 0)) + 2
    start = min(max(start, first_area), lrs.size)
    return np.arange(start, lrs.size + 1)
