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
extra columns ignored; an optional ``tokens`` column gives consumed tokens). Everything but the
command line lives in :mod:`megatron_wsm.annealing`: this module parses flags, calls
:func:`megatron_wsm.annealing.plan` and writes its table, JSON and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from megatron_wsm import annealing as an
from megatron_wsm import metric_names as names
from megatron_wsm.cli import command_parser

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
    p = command_parser(
        PROG,
        (
            f"Fit the annealing loss law {an.LAW} (S1 = LR area, S2 = momentum of LR drops) "
            "to training runs, predict the loss of other schedules and of WSM merges, and "
            "search the decay ratio / merge window with the lowest predicted final loss."
        ),
        EPILOG,
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
    g.add_argument(
        "--predict-start",
        type=int,
        default=None,
        metavar="ITER",
        help="first iteration scored in the --predict runs (default: --fit-start); e.g. the "
        "branch point of a decay branched off a fitted stable run, so that the shared part "
        "does not count as a prediction",
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
    for flag, searched, choices, what in (
        ("--search-shapes", ["1-sqrt", "linear", "cosine"], an.WSD_SHAPES, "WSD shapes"),
        ("--search-methods", ["1-sqrt", "mean", "ema"], an.MERGE_METHODS, "merge methods"),
    ):
        help_text = f"{what} searched (default: %(default)s)"
        s.add_argument(flag, nargs="+", default=searched, choices=choices, help=help_text)
    s.add_argument(
        "--merge-interval",
        type=int,
        default=None,
        metavar="ITERS",
        help="steps between window checkpoints in the merge search (default: window / 8)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input or unidentifiable, 1 I/O)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report, curves = an.plan(an.PlanRequest.from_namespace(args))
    except an.IdentificationError as exc:
        print(f"{PROG}: cannot fit: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(an.format_report(report))
    for target, writer in (
        (args.output_json, lambda f: _write_json(report, f)),
        (args.plot, lambda f: an.plot(report, curves, f)),
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
