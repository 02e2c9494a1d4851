"""The demo's margin over seeds: ``scripts/demo.sh`` run once per seed, merge minus stable.

The demo compares the stable last iterate's held-out loss with the WSM merge of its window.
Floating-point sums differ between CPUs and a few hundred steps amplify the differences, so one
machine's numbers say little about another's; other seeds are the proxy for other machines.
For every seed this runs the demo as a user does (``SEED=S bash scripts/demo.sh``, any demo
variable overridable with ``--set``), reads its ``stable.json`` and ``merged.json`` and prints
one row per seed (stable, merged, margin = merged - stable, relative margin) and the margin's
min / mean / max. ``--extra METHOD[@WINDOW_ITERS]`` also evaluates other merges of the same
window directory in memory (``tools/evaluate.py --load-dir``, same evaluation set), to compare
methods and window lengths on the same training runs.

    python bench/demo_margin.py --seeds 1234 1 2 3 4 --out /tmp/demo_margin/final
    python bench/demo_margin.py --seeds 1234 1 2 --set LR=1e-2 --set WSM_WINDOW=100 \\
        --extra mean@50 --extra ema@50 --extra 1-sqrt@30 --out /tmp/demo_margin/lr1e-2

Writes ``OUT/summary.json`` and ``OUT/table.md``; each seed's demo output is ``OUT/seedS.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_default(var: str) -> str:
    """The default of a demo variable, as ``scripts/demo.sh`` sets it (``VAR=${VAR:-value}``)."""
    text = (ROOT / "scripts" / "demo.sh").read_text()
    match = re.search(rf"^{var}=\$\{{{var}:-([^}}]*)\}}", text, re.M)
    return match.group(1) if match else "?"


def run_demo(seed: int, out: Path, overrides: dict[str, str]) -> tuple[dict, dict, float]:
    """(stable.json, merged.json, wall seconds) of ``scripts/demo.sh`` with ``SEED=seed``."""
    env = dict(os.environ, **overrides)
    env.update(
        SEED=str(seed),
        OUT=str(out),
        MASTER_PORT=str(free_port()),
        MASTER_PORT2=str(free_port()),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo.sh")],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
        )
    wall = time.perf_counter() - start
    return (
        json.loads((out / "stable.json").read_text()),
        json.loads((out / "merged.json").read_text()),
        wall,
    )


def evaluate_merge(window_dir: Path, spec: str, out_json: Path) -> float:
    """Held-out loss of the merge ``METHOD[@WINDOW_ITERS]`` of ``window_dir``, in memory."""
    method, _, window = spec.partition("@")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "evaluate.py"),
        "--load-dir",
        str(window_dir),
        "--method",
        method,
        "--eval-iters",
        "8",
        "--data-cache-dir",
        "data_cache",
        "--output-json",
        str(out_json),
    ]
    if window:
        cmd += ["--window-iters", window]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return json.loads(out_json.read_text())["loss"]


def spread(values: list[float]) -> str:
    return f"{min(values):+.4f} / {statistics.fmean(values):+.4f} / {max(values):+.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="a demo variable (LR, ITERS, WSM_INTERVAL, WSM_WINDOW, METHOD, ...)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="METHOD[@ITERS]",
        help="also evaluate this merge of each run's window (in memory)",
    )
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").unlink(missing_ok=True)

    rows = []
    for seed in args.seeds:
        out = (args.out / f"seed{seed}").resolve()
        stable, merged, wall = run_demo(seed, out, overrides)
        row = {
            "seed": seed,
            "stable": stable["loss"],
            "merged": merged["loss"],
            "margin": merged["loss"] - stable["loss"],
            "relative": (merged["loss"] - stable["loss"]) / stable["loss"],
            "demo_seconds": wall,
            "extra": {},
        }
        for spec in args.extra:
            loss = evaluate_merge(
                out / "ckpt" / "wsm_window",
                spec,
                out.parent / f"{out.name}_{spec.replace('@', '_')}.json",
            )
            row["extra"][spec] = {"loss": loss, "margin": loss - stable["loss"]}
        rows.append(row)
        print(
            f"seed {seed}: stable {row['stable']:.4f} merged {row['merged']:.4f} "
            f"margin {row['margin']:+.4f} ({100 * row['relative']:+.2f} %) "
            f"demo {wall:.0f} s "
            + " ".join(f"{k} {v['margin']:+.4f}" for k, v in row["extra"].items()),
            flush=True,
        )

    method = overrides.get("METHOD") or demo_default("METHOD")
    head = ["seed", "stable (last iterate)", f"merge {method}", "margin", "relative"]
    head += [f"margin {spec}" for spec in args.extra] + ["demo s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [
            str(r["seed"]),
            f"{r['stable']:.4f}",
            f"{r['merged']:.4f}",
            f"{r['margin']:+.4f}",
            f"{100 * r['relative']:+.2f} %",
        ]
        cells += [f"{r['extra'][spec]['margin']:+.4f}" for spec in args.extra]
        cells.append(f"{r['demo_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    settings = {
        var: overrides.get(var) or demo_default(var)
        for var in ("ITERS", "LR", "WSM_INTERVAL", "WSM_WINDOW", "METHOD")
    }
    lines.append("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    lines.append(f"margin min / mean / max: {spread([r['margin'] for r in rows])}")
    lines.append(
        "relative min / mean / max: "
        + " / ".join(
            f"{100 * f([r['relative'] for r in rows]):+.2f} %" for f in (min, statistics.fmean, max)
        )
    )
    for spec in args.extra:
        lines.append(
            f"margin {spec} min / mean / max: {spread([r['extra'][spec]['margin'] for r in rows])}"
        )
    table = "\n".join(lines)
    print()
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
