"""Across-seed summary of several ``examples/wsm_vs_wsd.sh`` output directories (one per seed).

Prints Markdown tables: held-out loss per checkpoint and seed with the mean and spread, the
paired differences against the WSD run (same seed = same data order and held-out tokens, so
these are the comparisons that carry signal), the ranking of the merges, the mean global
max/min MoE violations with their seed spread, the granularity grid (GRID=1), and the slope of
the stable run's training loss over the merge window (how much the oldest merged checkpoints
lag the newest).

    python examples/summarize_seeds.py runs/seed1234 runs/seed2 runs/seed3 [--window-iters 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from plot_wsm_vs_wsd import ROWS, collect_rows, load_histories

MERGES = ["WSM merge 1-sqrt", "WSM merge mean", "WSM merge EMA"]
WSD = "WSD (1-sqrt decay)"
STABLE = "WSM stable (last iterate)"


def load_seeds(outs: list[Path]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """seed -> checkpoint label -> (held-out loss, mean global max vio, mean global min vio)."""
    return {
        out.name: {r.label: (r.loss, r.vmax, r.vmin) for r in collect_rows(out)}
        for out in outs
    }


def spread(values: list[float]) -> str:
    """``mean (min – max)`` of a few seeds: with three seeds a range says more than a std."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ({min(values):.4f} – {max(values):.4f})"


def loss_table(data: dict[str, dict[str, tuple[float, float, float]]], labels: list[str]) -> str:
    seeds = list(data)
    lines = ["| checkpoint | " + " | ".join(seeds) + " | mean (range) |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for label in labels:
        vals = [data[s][label][0] for s in seeds if label in data[s]]
        if len(vals) != len(seeds):
            continue
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in vals)
                     + f" | {spread(vals)} |")
    return "\n".join(lines)


def paired_table(
    data: dict[str, dict[str, tuple[float, float, float]]], base: str,
    labels: list[str] | None = None,
) -> str:
    """checkpoint − base per seed (negative: better than base), and how many seeds are better."""
    seeds = list(data)
    lines = [f"| checkpoint − {base} | " + " | ".join(seeds)
             + " | mean | better in |", "|---|" + "---:|" * (len(seeds) + 2)]
    for label in labels or [STABLE, WSD, *MERGES]:
        if label == base or any(label not in data[s] for s in seeds):
            continue
        diffs = [data[s][label][0] - data[s][base][0] for s in seeds]
        better = sum(d < 0 for d in diffs)
        lines.append(f"| {label} | " + " | ".join(f"{d:+.4f}" for d in diffs)
                     + f" | {statistics.fmean(diffs):+.4f} | {better}/{len(seeds)} |")
    return "\n".join(lines)


def merge_ranking(data: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    lines = ["| seed | merges, best first |", "|---|---|"]
    for seed, rows in data.items():
        ranked = sorted((rows[m][0], m.replace("WSM merge ", "")) for m in MERGES if m in rows)
        lines.append(f"| {seed} | " + " < ".join(f"{m} {v:.4f}" for v, m in ranked) + " |")
    return "\n".join(lines)


def violation_table(data: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    seeds = list(data)
    lines = ["| checkpoint | mean global max vio, mean (range) | lower than WSD in |"
             " mean global min vio, mean (range) | lower than WSD in |",
             "|---|---:|---:|---:|---:|"]
    for label in [STABLE, WSD, *MERGES]:
        if any(label not in data[s] for s in seeds):
            continue
        vmax = [data[s][label][1] for s in seeds]
        vmin = [data[s][label][2] for s in seeds]
        if label == WSD:
            lo_max = lo_min = "—"
        else:
            lo_max = f"{sum(data[s][label][1] < data[s][WSD][1] for s in seeds)}/{len(seeds)}"
            lo_min = f"{sum(data[s][label][2] < data[s][WSD][2] for s in seeds)}/{len(seeds)}"
        lines.append(f"| {label} | {spread(vmax)} | {lo_max} | {spread(vmin)} | {lo_min} |")
    return "\n".join(lines)


def window_slope(out: Path, window_iters: int, edge: int = 20) -> tuple[float, float] | None:
    """Stable run's mean training loss over the first and the last ``edge`` iterations of the
    merge window (the oldest and the newest merged checkpoints' neighbourhoods), from the
    plot's histories (TensorBoard: complete across resumes; else result.json)."""
    stable = load_histories(out)["stable"]
    if not stable or not stable["train_history"]:
        return None
    hist = stable["train_history"]
    end = hist[-1]["iteration"]
    start = end - window_iters
    first = [h["loss"] for h in hist if start < h["iteration"] <= start + edge]
    last = [h["loss"] for h in hist if end - edge < h["iteration"] <= end]
    if not first or not last:
        return None
    return statistics.fmean(first), statistics.fmean(last)


def merge_profile(merged: Path) -> tuple[float, float, float] | None:
    """(coefficient-weighted mean iteration of the inputs, i.e. where the merge sits in the
    window; that minus the newest input's iteration; the newest input's coefficient) of a
    merged checkpoint, from its provenance."""
    path = merged / "wsm_merge_provenance.json"
    if not path.is_file():
        return None
    prov = json.loads(path.read_text())
    iters = [int(entry["iteration"]) for entry in prov["inputs"]]
    coeffs = prov["coefficients"]
    center = sum(c * i for c, i in zip(coeffs, iters)) / sum(coeffs)
    return center, center - max(iters), coeffs[iters.index(max(iters))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", type=Path, nargs="+", help="the script's OUT directories, one per seed")
    p.add_argument("--window-iters", type=int, default=200, help="the merge window (iterations)")
    args = p.parse_args(argv)
    data = load_seeds(args.outs)
    main_labels = [label for _, label in ROWS]
    grid = sorted({lab for rows in data.values() for lab in rows if lab.startswith("grid")},
                  key=lambda lab: int(lab.split("(")[1].split()[0]))
    print("### Held-out loss\n\n" + loss_table(data, main_labels))
    print("\n### Paired differences against WSD\n\n" + paired_table(data, WSD))
    print("\n### Merge ranking\n\n" + merge_ranking(data))
    print("\n### MoE load balance (held-out)\n\n" + violation_table(data))
    remedies = sorted({lab for rows in data.values() for lab in rows
                       if lab.startswith("WSM merge 1-sqrt,")})
    if remedies:
        print("\n### 1-sqrt remedies (longer window, decay floor)\n\n"
              + loss_table(data, [WSD, "WSM merge 1-sqrt", *remedies]))
        print("\n" + paired_table(data, WSD, remedies))
    if grid:
        print("\n### Granularity at a fixed duration (1-sqrt)\n\n"
              + loss_table(data, [WSD, STABLE, "WSM merge 1-sqrt", *grid]))
    print("\n### Where each merge sits in its window (coefficient profile, first seed)\n")
    print("| merge | centre (coefficient-weighted iteration) | behind the newest input |"
          " weight of the newest input |\n|---|---:|---:|---:|")
    first = args.outs[0]
    for merged in sorted(first.glob("merged_*")):
        profile = merge_profile(merged)
        if profile:
            print(f"| {merged.name} | {profile[0]:.1f} | {profile[1]:.1f} | {profile[2]:.3f} |")
    print("\n### Stable training loss over the merge window\n")
    print("| seed | first 20 it of the window | last 20 it | drop |\n|---|---:|---:|---:|")
    for out in args.outs:
        slope = window_slope(out, args.window_iters)
        if slope:
            print(f"| {out.name} | {slope[0]:.4f} | {slope[1]:.4f} | "
                  f"{slope[0] - slope[1]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
