"""Table and loss-curve plot of an ``examples/wsm_vs_wsd.sh`` output directory.

Reads the two trainings' histories (per-iteration loss and LR, held-out points, the merged
readout) from ``OUT/{wsd,stable}/tb`` (TensorBoard: complete across resumes) or else
``OUT/{wsd,stable}/result.json``,
``OUT/eval/*.json`` (``tools/evaluate.py`` results on the held-out split), the merge
provenance of ``OUT/merged_1sqrt`` (which window checkpoints were merged, with which
coefficients) and, when the script ran with ``EXPORT=1``, ``OUT/harness/*.json``
(``tools/eval_harness.py`` scores of the exported models, extra columns). Prints one table,
optionally writes it as Markdown, and draws a PNG.

    python examples/plot_wsm_vs_wsd.py --out runs/wsm_vs_wsd --png runs/wsm_vs_wsd/wsm_vs_wsd.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

#: Rows of the main table: eval JSON name -> label. Order = how a reader compares them.
ROWS = [
    ("stable", "WSM stable (last iterate)"),
    ("wsd", "WSD (1-sqrt decay)"),
    ("merged_1sqrt", "WSM merge 1-sqrt"),
    ("merged_mean", "WSM merge mean"),
    ("merged_ema", "WSM merge EMA"),
]


#: lm-eval columns (EXPORT=1): header -> (task, metric, format) in ``OUT/harness/<name>.json``.
HARNESS_COLUMNS = {
    "lm-eval bits/byte": ("wsm_heldout_ppl", "bits_per_byte", ".4f"),
    "lm-eval word ppl": ("wsm_heldout_ppl", "word_perplexity", ".1f"),
    "cloze acc": ("wsm_heldout_cloze", "acc", ".4f"),
    "cloze acc_norm": ("wsm_heldout_cloze", "acc_norm", ".4f"),
}


class Row(NamedTuple):
    """One checkpoint of the table: held-out evaluation, and lm-eval scores when exported."""

    label: str
    loss: float
    ppl: float
    vmax: float
    vmin: float
    harness: dict | None = None


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _row(label: str, result: dict, harness: dict | None) -> Row:
    moe = result.get("moe") or {}
    return Row(
        label,
        float(result["loss"]),
        float(result["perplexity"]),
        float(moe.get("mean_global_max_violation", math.nan)),
        float(moe.get("mean_global_min_violation", math.nan)),
        harness,
    )


def collect_rows(out: Path) -> list[Row]:
    """Every evaluated checkpoint of ``out``, in reading order (main rows, then the grid)."""
    names = list(ROWS)
    # Optional granularity grid (GRID=1 in the script): eval/grid_I<interval>_N<count>.json.
    grid = sorted(
        (out / "eval").glob("grid_*.json"),
        key=lambda p: [int(x[1:]) for x in p.stem.split("_")[1:]],
    )
    for path in grid:
        interval, count = (int(x[1:]) for x in path.stem.split("_")[1:])
        names.append((path.stem, f"grid 1-sqrt ({interval} it, {count})"))
    # Optional remedies (KEEP_ITERS, MIN_LR_RATIOS): a longer window, a decay floor.
    for path in sorted((out / "eval").glob("merged_1sqrt_w*.json")):
        names.append((path.stem, f"WSM merge 1-sqrt, {path.stem.split('_w')[-1]}-it window"))
    for path in sorted((out / "eval").glob("merged_1sqrt_r*.json")):
        names.append((path.stem, f"WSM merge 1-sqrt, min-lr-ratio {path.stem.split('_r')[-1]}"))
    rows = []
    for name, label in names:
        result = _load(out / "eval" / f"{name}.json")
        if result is not None:
            rows.append(_row(label, result, _load(out / "harness" / f"{name}.json")))
    return rows


def _harness_cell(harness: dict | None, task: str, metric: str, fmt: str) -> str:
    value = ((harness or {}).get(task) or {}).get(metric)
    return "—" if value is None else format(float(value), fmt)


def format_table(rows: list[Row]) -> str:
    """Markdown table; the lm-eval columns only when some row has harness scores."""
    with_harness = any(r.harness for r in rows)
    extra = list(HARNESS_COLUMNS) if with_harness else []
    head = ("| checkpoint | eval loss | perplexity | mean global max vio | mean global min vio |"
            + "".join(f" {h} |" for h in extra))
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        cells = "".join(f" {_harness_cell(r.harness, *HARNESS_COLUMNS[h])} |" for h in extra)
        lines.append(
            f"| {r.label} | {r.loss:.4f} | {r.ppl:.2f} | {r.vmax:.4f} | {r.vmin:.4f} |" + cells
        )
    return "\n".join(lines)


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing running mean: per-iteration losses of an 8-sequence batch are very noisy."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def _tensorboard_history(run_dir: Path) -> dict | None:
    """``{"train_history": [...], "wsm_readouts": [...]}`` of a run from its TensorBoard
    events, which span every invocation of a resumed run (its result.json holds only the
    last invocation's part); None without events."""
    from megatron_wsm import metric_names as names
    from megatron_wsm.annealing.logs import tensorboard_scalars

    tb = run_dir / "tb"
    if not tb.is_dir():
        return None
    readout_tag = names.wsm_readout(names.VALID_LOSS, "1-sqrt")
    got = tensorboard_scalars(tb, (names.LM_LOSS, names.LEARNING_RATE, names.VALID_LOSS,
                                   readout_tag))
    if names.LM_LOSS not in got or names.LEARNING_RATE not in got:
        return None
    rows = {step: {"iteration": step, "loss": v} for step, v in got[names.LM_LOSS].items()}
    for tag, key in ((names.LEARNING_RATE, "lr"), (names.VALID_LOSS, "valid_loss")):
        for step, v in got.get(tag, {}).items():
            if step in rows:
                rows[step][key] = v
    readouts = [{"iteration": step, "loss": v}
                for step, v in sorted(got.get(readout_tag, {}).items())]
    history = [rows[k] for k in sorted(rows) if "lr" in rows[k]]
    return {"train_history": history, "wsm_readouts": readouts} if history else None


def load_histories(out: Path) -> dict[str, dict | None]:
    """Training histories of the ``wsd`` and ``stable`` runs, complete from iteration 1: from
    TensorBoard when there, else result.json. A WSD run branched off the stable run (it
    starts later) gets the stable run's part before its first iteration prepended: the two
    runs are the same up to there."""
    runs = {}
    for name in ("wsd", "stable"):
        runs[name] = _tensorboard_history(out / name) or _load(out / name / "result.json")
    wsd, stable = runs["wsd"], runs["stable"]
    if wsd and stable and wsd["train_history"] and stable["train_history"]:
        first = wsd["train_history"][0]["iteration"]
        shared = [h for h in stable["train_history"] if h["iteration"] < first]
        runs["wsd"] = {**wsd, "train_history": shared + wsd["train_history"]}
    return runs


def plot(out: Path, png: Path, smooth: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and the 2-core box have no display
    import matplotlib.pyplot as plt

    runs = load_histories(out)
    prov = _load(out / "merged_1sqrt" / "wsm_merge_provenance.json")
    evals = {name: _load(out / "eval" / f"{name}.json") for name, _ in ROWS}

    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    colors = {"wsd": "tab:red", "stable": "tab:gray"}
    labels = {"wsd": "WSD (1-sqrt decay) train loss", "stable": "stable LR (WSM) train loss"}
    last_iter = 0
    for name, run in runs.items():
        if run is None:
            continue
        hist = run["train_history"]
        its = [h["iteration"] for h in hist]
        last_iter = max(last_iter, its[-1])
        ax.plot(
            its,
            _smooth([h["loss"] for h in hist], smooth),
            color=colors[name],
            lw=1.2,
            label=f"{labels[name]} (mean of {smooth})",
        )
        ax_lr.plot(its, [h["lr"] for h in hist], color=colors[name], lw=1.2)

    # Held-out curves during training: live weights of both runs, and the stable run's merged
    # readout of its window (--wsm-eval-methods 1-sqrt).
    for name, run in runs.items():
        if run is None:
            continue
        points = [(h["iteration"], h["valid_loss"]) for h in run["train_history"]
                  if "valid_loss" in h]
        if points:
            ax.plot(*zip(*points), color=colors[name], lw=1, ls="--", marker=".",
                    label=f"{labels[name].replace('train loss', 'held-out loss')}")
    readouts = [r for r in (runs.get("stable") or {}).get("wsm_readouts", []) if "loss" in r]
    if readouts:
        ax.plot([r["iteration"] for r in readouts], [r["loss"] for r in readouts],
                color="tab:blue", lw=1.5, marker="o", ms=4,
                label="held-out loss of the merged window (1-sqrt readout, in training)")

    # Held-out losses of the final checkpoints, drawn at the last iteration.
    markers = {
        "stable": ("tab:gray", "o"),
        "wsd": ("tab:red", "s"),
        "merged_1sqrt": ("tab:blue", "*"),
        "merged_mean": ("tab:cyan", "D"),
        "merged_ema": ("tab:purple", "^"),
    }
    for (name, label), (color, marker) in zip(ROWS, markers.values()):
        if evals.get(name) is not None:
            ax.scatter(
                [last_iter],
                [evals[name]["loss"]],
                color=color,
                marker=marker,
                s=60,
                zorder=4,
                edgecolors="black",
                linewidths=0.5,
                label=f"held-out: {label} {evals[name]['loss']:.3f}",
            )

    # Zoom on the part where the schedules differ: the first iterations dwarf the rest.
    finals = [e["loss"] for e in evals.values() if e is not None]
    if finals and last_iter > 50:
        tail = [
            v
            for run in runs.values()
            if run
            for v in _smooth([h["loss"] for h in run["train_history"]], smooth)[
                len(run["train_history"]) // 4 :
            ]
        ]
        lo, hi = min(finals + tail), max(finals + tail)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    if prov is not None:
        inputs = prov["inputs"]
        its = [i["iteration"] for i in inputs]
        for a in (ax, ax_lr):
            a.axvspan(min(its), max(its), color="tab:blue", alpha=0.08, lw=0)
        # Merge points: the window checkpoints on the bottom edge (after the zoom above),
        # marker size ~ their 1-sqrt coefficient.
        ymin = ax.get_ylim()[0]
        ax.scatter(
            its,
            [ymin] * len(its),
            s=[10 + 300 * i["coefficient"] for i in inputs],
            color="tab:blue",
            marker="^",
            zorder=3,
            clip_on=False,
            label="merged checkpoints (size ~ 1-sqrt coefficient)",
        )

    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("LR")
    ax_lr.set_xlabel("iteration (window shaded)")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the script's OUT directory")
    p.add_argument("--png", type=Path, help="write the loss-curve plot here")
    p.add_argument("--table", type=Path, help="also write the table here (Markdown)")
    p.add_argument("--smooth", type=int, default=20, help="running-mean width of train loss")
    p.add_argument("--title", default="WSM vs WSD, tiny MoE on the embedded corpus (equal tokens)",
                   help="the plot's title")
    args = p.parse_args(argv)

    rows = collect_rows(args.out)
    if not rows:
        raise SystemExit(f"no evaluation results under {args.out}/eval")
    table = format_table(rows)
    print()
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    if args.png:
        plot(args.out, args.png, args.smooth, args.title)
        print(f"\nloss curves: {args.png}")
    bad = [r[0] for r in rows if not math.isfinite(r[1])]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
