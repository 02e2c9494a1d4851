"""``tools/list_checkpoints.py PATH...``: the checkpoints at or under each path and their state.

A path may be one checkpoint directory, a checkpoint root (``--save``: its ``iter_*``), or a run
directory whose direct subdirectories are checkpoint roots (``<save>/wsm_window``). A checkpoint
is shown complete only when its manifest says so *and* its torch_dist files hold every byte
range its ``.metadata`` names; ``--verify`` also re-computes the CRC-32 of all tensor data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import layout
from megatron_wsm.checkpoint.layout import CheckpointInfo

PROG = "list_checkpoints.py"
#: Exit codes: a problem found by --verify; a path missing or holding no checkpoint.
EXIT_PROBLEMS = 1
EXIT_NOT_FOUND = 2


class ListError(RuntimeError):
    """A path given on the command line holds no checkpoint; the message is one line."""


def find_checkpoints(path: str | Path) -> list[CheckpointInfo]:
    """Checkpoints at ``path``: itself, its ``iter_*``, then those of each direct subdirectory
    holding ``iter_*`` (e.g. ``wsm_window``), each group oldest first.

    Raises:
        ListError: ``path`` does not exist, is not a directory, or holds no checkpoint.
    """
    root = Path(path)
    if not root.exists():
        raise ListError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise ListError(f"{root}: not a directory")
    if layout.is_checkpoint_dir(root):
        return [layout.read_checkpoint(root)]
    found = layout.list_checkpoints(root)
    roots = [p for p in root.iterdir() if p.is_dir() and layout.parse_name(p.name) is None]
    for sub in sorted(roots):
        found += layout.list_checkpoints(sub)
    if not found:
        raise ListError(f"{root}: no checkpoint found (no iter_* here or one level below)")
    return found


def storage_note(info: CheckpointInfo) -> str | None:
    """Why a checkpoint complete by its manifest is not usable: its torch_dist files do not hold
    what its ``.metadata`` names (missing or short shard); None when they do or not torch_dist.

    Cheap (one ``stat`` per shard file), so the plain listing runs it for every checkpoint.
    """
    if not info.complete:
        return None
    problems = layout.storage_problems(info.path, info.manifest)
    return _summarise(problems) if problems else None


def verify_problems(info: CheckpointInfo) -> list[str] | None:
    """Every integrity problem of a checkpoint (empty: OK): its files (regular files, shard
    names and ranges, the CRC-32 of all data), its common state (present, readable) and its
    iteration (name, manifest and common state agree) —
    :func:`~megatron_wsm.checkpoint.layout.checkpoint_problems`.

    None when it cannot be verified: not a torch_dist checkpoint (no ``.metadata`` and no
    manifest naming torch_dist), or an incomplete save whose files are expected to be partial.
    """
    if not info.complete:
        return None
    if not _is_torch_dist(info):
        return None
    return layout.checkpoint_problems(info.path, info.manifest, crc=True)


def _is_torch_dist(info: CheckpointInfo) -> bool:
    # A manifest that promises torch_dist shards without .metadata is a broken checkpoint.
    return layout.is_torch_dist(info.path, info.manifest)


def _summarise(problems: list[str]) -> str:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"refused: {problems[0]}{more}"


def _row(info: CheckpointInfo, verify: bool) -> dict[str, Any]:
    """One checkpoint's row; a checkpoint whose files cannot even be examined is shown as
    refused (with why) instead of stopping the listing."""
    try:
        return _checked_row(info, verify)
    except (OSError, ValueError) as e:
        why = f"refused: {e}"
        row = {
            "path": str(info.path), "kind": "?",
            "iteration": info.iteration if info.iteration >= 0 else None,
            "consumed_tokens": None, "learning_rate": None, "bytes": 0,
            "complete": False, "note": why,
        }
        if verify:
            row["verify"], row["problems"] = "1 problem(s)", [why]
        return row


def _checked_row(info: CheckpointInfo, verify: bool) -> dict[str, Any]:
    m = info.manifest
    note = info.error or ""
    complete = info.complete
    bad_storage = storage_note(info)
    if bad_storage is not None:
        complete, note = False, bad_storage
    row: dict[str, Any] = {
        "path": str(info.path),
        "kind": m.kind if m else "?",
        "iteration": info.iteration if info.iteration >= 0 else None,
        "consumed_tokens": m.consumed_tokens if m else None,
        "learning_rate": m.learning_rate if m else None,
        "bytes": info.size_bytes(),
        "complete": complete,
        "note": note,
    }
    if verify:
        if info.unreadable:  # a manifest that is not one, a symlink, a name that disagrees
            row["verify"], row["problems"] = "refused", [str(info.error)]
        elif not _is_torch_dist(info):
            row["verify"], row["problems"] = "not torch_dist (no .metadata): not verified", []
        elif not info.complete:
            row["verify"], row["problems"] = "incomplete: not verified", []
        else:
            problems = verify_problems(info) or []
            row["verify"] = "OK" if not problems else f"{len(problems)} problem(s)"
            row["problems"] = problems
            if problems:
                row["complete"] = False
    return row


def _print_table(rows: list[dict[str, Any]], verify: bool) -> None:
    print(f"{'kind':7} {'iteration':>9} {'tokens':>12} {'lr':>10} {'MiB':>8}  complete  path")
    for r in rows:
        tokens = f"{r['consumed_tokens']:,}" if r["consumed_tokens"] is not None else "-"
        lr = f"{r['learning_rate']:.3e}" if r["learning_rate"] is not None else "-"
        iteration = r["iteration"] if r["iteration"] is not None else "-"
        done = "yes" if r["complete"] else "NO"
        note = f"  ({r['note']})" if r["note"] else ""
        print(
            f"{r['kind']:7} {iteration:>9} {tokens:>12} {lr:>10} "
            f"{r['bytes'] / 2**20:>8.2f}  {done:8}  {r['path']}{note}"
        )
        if verify:
            print(f"{'':9}verify: {r['verify']}")
            for p in r["problems"]:
                print(f"{'':11}- {p}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List full / window / merged checkpoints: iteration, tokens, LR, size, "
        "complete or not. Incomplete ones (interrupted saves, shard files that do not match "
        ".metadata) are shown and marked. Exit status: 0 ok, 1 --verify found a problem, "
        "2 a path is missing or holds no checkpoint.",
    )
    parser.add_argument(
        "dirs", nargs="+", metavar="PATH",
        help="a checkpoint directory, a checkpoint root (--save, --wsm-save) or a run "
        "directory (its subdirectories holding iter_* are listed too, e.g. wsm_window)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--complete-only", action="store_true", help="hide incomplete ones")
    parser.add_argument(
        "--verify", action="store_true",
        help="also check every complete torch_dist checkpoint fully: metadata, shard names and "
        "ranges, and the CRC-32 of all tensor data (reads every byte)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print a table (or JSON) of the checkpoints at or under each path given."""
    args = build_parser().parse_args(argv)
    rows: list[dict[str, Any]] = []
    rc = 0
    for path in args.dirs:
        try:
            infos = find_checkpoints(path)
        except ListError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            rc = EXIT_NOT_FOUND
            continue
        rows += [_row(info, args.verify) for info in infos]
    if args.complete_only:
        rows = [r for r in rows if r["complete"]]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif rows:
        _print_table(rows, args.verify)
    if args.verify and rc == 0 and any(r["problems"] for r in rows):
        rc = EXIT_PROBLEMS
    if args.verify and rc == 0 and not any(r["complete"] for r in rows):
        # --verify is a promise that what is listed was checked: with no complete checkpoint
        # (every one unfinished, unrecognised or refused) nothing was, and that is no "all is
        # well" (a save directory we cannot read must not pass a check).
        print(f"{PROG}: --verify: no complete checkpoint was found to verify", file=sys.stderr)
        rc = EXIT_PROBLEMS
    return rc
