"""Join a branched run's TensorBoard log onto its parent's, as the planner's CSV.

A WSD decay branched off a stable run at iteration B logs only iterations > B; the annealing
planner needs the whole LR curve. This writes ``step,lr,loss,tokens`` rows: the parent's up to
B, then the branch's own.

    python examples/branch_csv.py runs/x/stable/tb runs/x/wsd10/tb 900 wsd10.csv
"""

from __future__ import annotations

import csv
import sys

from megatron_wsm import metric_names as names
from megatron_wsm.annealing.logs import tensorboard_scalars


def branch_rows(parent: str, branch: str, branch_at: int) -> list[tuple]:
    """(step, lr, loss, tokens) of the parent up to ``branch_at``, then of the branch."""
    rows = []
    for path, keep in ((parent, lambda s: s <= branch_at), (branch, lambda s: s > branch_at)):
        got = tensorboard_scalars(path, (names.LEARNING_RATE, names.LM_LOSS,
                                         names.CONSUMED_TOKENS))
        lr, loss, tokens = (got.get(t, {}) for t in (names.LEARNING_RATE, names.LM_LOSS,
                                                      names.CONSUMED_TOKENS))
        rows += [(s, lr[s], loss.get(s, ""), tokens.get(s, "")) for s in sorted(lr) if keep(s)]
    return rows


def main(argv: list[str]) -> int:
    parent, branch, branch_at, out = argv[0], argv[1], int(argv[2]), argv[3]
    rows = branch_rows(parent, branch, branch_at)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "tokens"])
        writer.writerows(rows)
    print(f"{out}: {len(rows)} rows, steps {rows[0][0]}..{rows[-1][0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
