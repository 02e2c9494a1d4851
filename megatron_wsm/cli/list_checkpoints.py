"""``tools/list_checkpoints.py DIR``: the checkpoints under a directory and their state."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megatron_wsm.checkpointing import list_checkpoints


def main(argv: Sequence[str] | None = None) -> int:
    """Print a table (or JSON) of the checkpoints under each directory given."""
    parser = argparse.ArgumentParser(
        prog="list_checkpoints.py",
        description="List full / window / merged checkpoints: iteration, tokens, LR, size, "
        "complete or not. Incomplete ones (interrupted saves) are shown and marked.",
    )
    parser.add_argument("dirs", nargs="+", help="checkpoint roots (--save, --wsm-save)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--complete-only", action="store_true", help="hide incomplete ones")
    args = parser.parse_args(argv)
    rows = []
    for root in args.dirs:
        for c in list_checkpoints(root, include_incomplete=not args.complete_only):
            m = c.manifest
            rows.append(
                {
                    "path": str(c.path),
                    "kind": m.kind if m else "?",
                    "iteration": c.iteration,
                    "consumed_tokens": m.consumed_tokens if m else None,
                    "learning_rate": m.learning_rate if m else None,
                    "bytes": c.size_bytes(),
                    "complete": c.complete,
                    "note": c.error or "",
                }
            )
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not rows:
        print("no checkpoints found")
        return 0
    print(f"{'kind':7} {'iteration':>9} {'tokens':>12} {'lr':>10} {'MiB':>8}  complete  path")
    for r in rows:
        tokens = f"{r['consumed_tokens']:,}" if r["consumed_tokens"] is not None else "-"
        lr = f"{r['learning_rate']:.3e}" if r["learning_rate"] is not None else "-"
        done = "yes" if r["complete"] else "NO"
        note = f"  ({r['note']})" if r["note"] else ""
        print(
            f"{r['kind']:7} {r['iteration']:>9} {tokens:>12} {lr:>10} "
            f"{r['bytes'] / 2**20:>8.2f}  {done:8}  {r['path']}{note}"
        )
    return 0
