"""``wsm_weights``: show the merge coefficients of a decay method and the decay they emulate.

Examples::

    python tools/wsm_weights.py --method 1-sqrt --k 8
    python tools/wsm_weights.py --method 1-sqrt mean ema --k 8 --alpha 0.3 --json
    python tools/wsm_weights.py --weights 0,0.2,0.3,0.5               # implied decay of c
    python tools/wsm_weights.py --decay weights.txt --method 1-sqrt    # compare with 1-sqrt
    python tools/wsm_weights.py --method 1-sqrt mean --k 3 --convention megatron-lm
    python tools/wsm_weights.py --method 1-sqrt --positions 0,100,200,400  # uneven window
    python tools/wsm_weights.py --k 8 --method linear cosine 1-sqrt inverse-sqrt \\
        exponential mean ema --plot docs/wsm_weights_k8.png

The math lives in :mod:`megatron_wsm.coefficients`; this module only parses, prints and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_wsm.cli import command_parser
from megatron_wsm.coefficients import (
    DEFAULT_CONVENTION,
    FORMULAS,
    METHODS,
    SHAPE_METHODS,
    MergeMethod,
    decay_from_coefficients,
    decay_shape,
    describe_convention,
    discretisation,
    is_evenly_spaced,
    window_fractions,
)

PROG = "wsm_weights"
EPILOG = """examples:
  wsm_weights.py --method 1-sqrt --k 8
  wsm_weights.py --method 1-sqrt mean ema --k 8 --alpha 0.3 --json
  wsm_weights.py --weights 0,0.2,0.3,0.5             # the decay these weights emulate
  wsm_weights.py --decay weights.txt --method 1-sqrt # custom decay beside 1-sqrt
  wsm_weights.py --method 1-sqrt mean --k 3 --convention megatron-lm
                                                     # Megatron-LM weighted_merge.py weights
  wsm_weights.py --method 1-sqrt --positions 0,100,200,400
                                                     # uneven window (iterations or tokens)
  wsm_weights.py --k 8 --method linear cosine 1-sqrt inverse-sqrt exponential mean ema \\
      --plot docs/wsm_weights_k8.png                 # the figure in docs/
"""
DISCRETISATION = "w_i = f((i-1)/k), i = 1..k; c_0..c_k oldest checkpoint first"


def discretisation_line(
    convention: str = DEFAULT_CONVENTION,
    positions: Sequence[float] | None = None,
    sampling: str = "start",
) -> str:
    """The discretisation in force, as printed in tables, JSON and plot titles."""
    uneven = positions is not None and not is_evenly_spaced(positions)
    return f"{discretisation(convention, uneven=uneven, sampling=sampling)}; " + (
        "c_0..c_k oldest checkpoint first"
    )


@dataclass
class MethodResult:
    """Coefficients and implied decay of one method, plus the parameters that made them."""

    method: str
    params: dict[str, Any]
    coefficients: list[float]
    decay: list[float]
    formula: str = field(default="")
    #: :func:`megatron_wsm.coefficients.describe_convention` of the coefficients.
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (floats keep full float64 precision through ``json``)."""
        return {
            "method": self.method,
            "formula": self.formula,
            "params": self.params,
            "coefficients": self.coefficients,
            "decay": self.decay,
            "zero_weight_inputs": self.info.get("zero_weight_inputs", []),
            "notes": self.info.get("notes", []),
        }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so docs and tests can inspect it)."""
    p = command_parser(
        PROG,
        (
            "Print the WSM merge coefficients c_0..c_k (oldest checkpoint first) of a decay "
            "method and the decay w_1..w_k they emulate (Theorem 3.1: c_k = w_k, "
            f"c_j = w_j - w_(j+1), c_0 = 1 - w_1). Discretisation: {DISCRETISATION}."
        ),
        EPILOG,
    )
    MergeMethod.add_cli_flags(p, several=True, coefficients_alias=True)
    p.add_argument(
        "--all",
        action="store_true",
        help="every named method (all of --method's choices except custom)",
    )
    p.add_argument("--k", type=int, help="number of merged intervals (k+1 checkpoints)")
    p.add_argument(
        "--positions",
        metavar="LIST",
        help=(
            "checkpoint positions p_0..p_k, oldest first (iterations or consumed tokens, "
            "comma list): shape methods are evaluated at t_j = (p_j - p_0)/(p_k - p_0), so "
            "an uneven window emulates the intended decay; sets k"
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw w and c of every selected method side by side into this image",
    )
    p.add_argument("--dpi", type=int, default=120, help="resolution of --plot (default 120)")
    return p


def _selected_methods(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    methods: list[str] = list(METHODS[:-1]) if args.all else []
    for m in args.method or []:
        if m not in methods:
            methods.append(m)
    has_custom = args.weights is not None or args.decay is not None
    if "custom" in methods and not has_custom:
        parser.error("--method custom needs --weights or --decay")
    if has_custom and "custom" not in methods:
        methods.append("custom")
    if not methods:
        parser.error("choose --method (one or more), --all, --weights or --decay")
    if args.alpha is not None and "ema" not in methods:
        parser.error("--alpha only applies to --method ema")
    if args.final_ratio is not None and not {"exponential", "inverse-sqrt"} & set(methods):
        parser.error("--final-ratio only applies to --method exponential or inverse-sqrt")
    if args.allow_negative and not has_custom:
        parser.error("--allow-negative only applies to --weights or --decay")
    return methods


def parse_positions(text: str) -> list[int | float]:
    """Checkpoint positions from a comma/whitespace list; integers stay exact ints."""
    tokens = text.replace(",", " ").split()
    if not tokens:
        raise ValueError("--positions is empty: give p_0,...,p_k (iterations or tokens)")
    out: list[int | float] = []
    for tok in tokens:
        try:
            out.append(int(tok))
        except ValueError:
            try:
                out.append(float(tok))
            except ValueError:
                raise ValueError(f"--positions: not a number: {tok!r}") from None
    return out


def _positions(args: argparse.Namespace, k: int | None) -> list[int | float] | None:
    if args.positions is None:
        return None
    positions = parse_positions(args.positions)
    if k is not None and len(positions) != k + 1:
        raise ValueError(
            f"--positions gives {len(positions)} checkpoints but k = {k} means {k + 1}"
        )
    return positions


def compute(args: argparse.Namespace, methods: Sequence[str]) -> tuple[int, list[MethodResult]]:
    """Resolve k and compute every method; raises ``ValueError`` on any invalid input."""
    k = args.k
    convention = getattr(args, "convention", DEFAULT_CONVENTION)
    sampling = getattr(args, "sampling", "start")
    positions = _positions(args, k) if getattr(args, "positions", None) is not None else None
    if positions is not None:
        k = len(positions) - 1
    custom_result = None
    if "custom" in methods:
        custom = MergeMethod.from_cli(args, method="custom")
        c = custom.coefficients(k)
        w = decay_from_coefficients(c, allow_negative=args.allow_negative)
        # A custom list fixes k; named methods shown beside it use the same k.
        k = len(w)
        # "coefficients" in the output: the key of the JSON format (the flag is --weights).
        key, source = (
            ("coefficients", args.weights) if args.weights is not None else ("decay", args.decay)
        )
        params = {key: str(source), "allow_negative": args.allow_negative}
        info = describe_convention(
            c, method="custom", convention=convention, positions=positions, sampling=sampling
        )
        custom_result = MethodResult("custom", params, c, w, f"custom {key}", info)
    if k is None:
        raise ValueError("--k is required (number of merged intervals, k+1 checkpoints)")
    # Without --positions the window is 0..k: the index path (or its mean sampling).
    where: int | list[int | float] = positions if positions is not None else k

    results = []
    for m in methods:
        if m == "custom":
            assert custom_result is not None
            results.append(custom_result)
            continue
        method = MergeMethod.from_cli(args, method=m).resolved()
        c = method.coefficients(where)
        w = method.decay_weights(where)
        kw = {
            "min_lr_ratio": method.min_lr_ratio,
            "alpha": method.alpha,
            "final_ratio": method.final_ratio,
        }
        params = {key: val for key, val in kw.items() if val is not None}
        info = describe_convention(
            c, method=m, positions=positions, convention=convention, sampling=sampling
        )
        formula = FORMULAS[m]
        if m == "mean" and convention == "megatron-lm":
            formula = str(info["discretisation"])
        results.append(MethodResult(m, params, c, w, formula, info))
    return k, results


def format_table(
    k: int,
    results: Sequence[MethodResult],
    *,
    positions: Sequence[float] | None = None,
    line: str = DISCRETISATION,
) -> str:
    """Human-readable table: one block per method, a row per checkpoint."""
    lines = []
    for r in results:
        extras = ", ".join(f"{key}={val}" for key, val in r.params.items())
        lines.append(f"{r.method}: {r.formula}   [k={k}; {extras}]")
        lines.append(f"  {'j':>3}  {'checkpoint':<10}  {'c_j (merge)':>12}  {'w_j (decay)':>12}")
        for j, cj in enumerate(r.coefficients):
            name = "n" if j == 0 else f"n+{j}"
            if positions is not None:
                name = f"{name}@{positions[j]}"
            wj = f"{r.decay[j - 1]:12.8f}" if j >= 1 else f"{'-':>12}"
            lines.append(f"  {j:>3}  {name:<10}  {cj:12.8f}  {wj}")
        total = math.fsum(r.coefficients)
        if positions is None:
            mean_w = math.fsum(r.decay) / len(r.decay)
        else:
            # Uneven intervals: the LR area weights each w_i by its interval's length.
            t = window_fractions(positions)
            mean_w = math.fsum(w * (b - a) for w, a, b in zip(r.decay, t, t[1:], strict=False))
        lines.append(f"  sum c = {total:.12f}   mean w (LR area of the window) = {mean_w:.6f}")
        lines.extend(f"  note: {note}" for note in r.info.get("notes", []))
        lines.append("")
    lines.append(
        "c_j weights checkpoint n+j (j = 0 oldest); w_j scales the LR of interval j "
        "(checkpoint n+j-1 -> n+j)."
    )
    lines.append(f"Discretisation: {line}.")
    return "\n".join(lines)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot(
    k: int,
    results: Sequence[MethodResult],
    path: str,
    dpi: int = 120,
    *,
    positions: Sequence[float] | None = None,
    line: str = DISCRETISATION,
) -> None:
    """Draw, per method, the implied decay (top) and the merge coefficients (bottom)."""
    # Figure + Agg canvas rather than pyplot: no global backend state, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(results)
    ncols = min(n, 4)
    nblocks = math.ceil(n / ncols)
    fig = Figure(figsize=(3.3 * ncols + 0.4, 5.2 * nblocks + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 * nblocks, ncols)
    cmax = max(max(r.coefficients) for r in results)
    cmin = min(0.0, min(min(r.coefficients) for r in results))
    edges = window_fractions(positions) if positions is not None else [i / k for i in range(k + 1)]
    starts = edges[:-1]
    ts = [i / 400 for i in range(401)]
    for idx, r in enumerate(results):
        block, col = divmod(idx, ncols)
        color = f"C{idx % 10}"
        ax_w = fig.add_subplot(grid[2 * block, col])
        ax_c = fig.add_subplot(grid[2 * block + 1, col])

        if r.method in SHAPE_METHODS:
            curve = [
                decay_shape(
                    r.method,
                    t,
                    min_lr_ratio=r.params.get("min_lr_ratio", 0.0),
                    final_ratio=r.params.get("final_ratio"),
                )
                for t in ts
            ]
            ax_w.plot(ts, curve, color="0.6", lw=1, ls="--", label="shape f(t)")
        ax_w.stairs(r.decay, edges, baseline=None, color=color, lw=2, label="w_i (LR scale)")
        ax_w.plot(starts, r.decay, "o", color=color, ms=3)
        ax_w.set_xlim(0, 1)
        ax_w.set_ylim(min(0.0, min(r.decay)) - 0.03, max(1.0, max(r.decay)) + 0.05)
        # Only the numbers that shape the curve; a zero floor is the default and just noise.
        shown = ", ".join(
            f"{key}={val:.4g}"
            for key, val in r.params.items()
            if _is_real(val) and not (key == "min_lr_ratio" and val == 0)
        )
        title = f"{r.method}  ({shown})" if shown else r.method
        ax_w.set_title(f"{title}\n{r.formula}", fontsize=9)
        ax_w.set_xlabel(
            "window fraction t (interval i spans [t_(i-1), t_i])"
            if positions is not None
            else "window fraction t (interval i spans [(i-1)/k, i/k])",
            fontsize=7,
        )
        ax_w.tick_params(labelsize=7)
        ax_w.grid(alpha=0.3)
        if idx == 0:
            ax_w.legend(fontsize=7, loc="upper right")

        ax_c.bar(range(k + 1), r.coefficients, color=color, width=0.8)
        ax_c.axhline(0.0, color="0.3", lw=0.6)
        ax_c.set_ylim(cmin * 1.1, cmax * 1.1 + 0.01)
        ax_c.set_xlabel("checkpoint n+j (j = 0 oldest)", fontsize=7)
        ax_c.set_ylabel("merge coefficient c_j", fontsize=7)
        if k <= 16:
            ax_c.set_xticks(range(k + 1))
        ax_c.tick_params(labelsize=7)
        ax_c.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"WSM: merge coefficients and the decay they emulate, k = {k}  ({line})",
        fontsize=10,
    )
    # Drop the version stamp so regenerating the committed figure gives a stable file.
    fig.savefig(path, dpi=dpi, metadata={"Software": None})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 2 bad input, 1 cannot write)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = _selected_methods(args, parser)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        # Refuse before printing anything: a half-done run would look like success.
        print(
            f"{PROG}: error: cannot write plot {args.plot!r}: its directory does not exist",
            file=sys.stderr,
        )
        return 1
    try:
        k, results = compute(args, methods)
        positions = _positions(args, k)
        line = discretisation_line(args.convention, positions, args.sampling)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    if args.json:
        doc = {
            "k": k,
            "discretisation": line,
            "convention": args.convention,
            "sampling": args.sampling,
            "positions": positions,
            "methods": [r.to_json() for r in results],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(k, results, positions=positions, line=line))

    if args.plot:
        try:
            plot(k, results, args.plot, dpi=args.dpi, positions=positions, line=line)
        except (OSError, ValueError) as exc:
            # ValueError: matplotlib rejects an unknown image extension.
            print(f"{PROG}: error: cannot write plot {args.plot!r}: {exc}", file=sys.stderr)
            return 1
        # stderr, so that --json output on stdout stays machine-readable.
        print(f"{PROG}: wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
