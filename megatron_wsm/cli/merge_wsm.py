"""``merge_wsm``: merge a window of checkpoints into one, shard by shard (the "M" of WSM).

Examples::

    # the newest 8 window checkpoints under runs/x/window, 1-sqrt weights, on 1 process
    python tools/merge_wsm.py --load-dir runs/x/window --count 9 --method 1-sqrt \\
        --save runs/x/merged
    # explicit inputs, 4 merge ranks, what would happen (nothing written)
    torchrun --nproc-per-node 4 tools/merge_wsm.py --inputs ckpt/iter_0001000 \\
        ckpt/iter_0002000 ckpt/iter_0003000 --weights 0,0.3,0.7 --save out --dry-run

The merge logic lives in :mod:`megatron_wsm.merge`; this module parses, launches and prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from megatron_wsm.cli import command_parser

PROG = "merge_wsm"
EPILOG = """coefficients:
  c_0..c_k belong to the k+1 inputs ordered oldest first (by iteration when the manifests or
  iter_N names tell it). --method derives them from a decay shape (Theorem 3.1: the merge then
  equals training with that decay over the window), evaluated where the checkpoints really are
  (--positions-from: iterations by default, so a skipped checkpoint leaves an uneven window that
  the weights follow; evenly spaced checkpoints give the same weights as by index); --weights
  gives them directly. The decay they emulate, the convention and every input of weight 0 (and
  why) are printed. See tools/wsm_weights.py to explore methods.

what is merged:
  floating-point model tensors (buffers such as MoE expert_bias included) are averaged in fp32;
  integer tensors, _extra_state, RNG, scheduler and iteration are copied from the newest input;
  optimizer state is dropped (the output is a model-only checkpoint of kind "merged").

examples:
  merge_wsm.py --load-dir CKPTS --window-iters 2000 --method 1-sqrt --save MERGED
  merge_wsm.py --inputs A B C --weights 0,0.4,0.6 --save MERGED --dry-run
  torchrun --nproc-per-node 4 merge_wsm.py --load-dir CKPTS --count 9 --method mean --save M
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from megatron_wsm.coefficients import MergeMethod
    from megatron_wsm.merge import DEFAULT_CHUNK_MB, OUTPUT_DTYPES, POSITION_UNITS

    p = command_parser(
        PROG,
        (
            "Average a window of checkpoints saved at a constant learning rate into one "
            "checkpoint, with weights from a decay schedule (WSM). Works shard by shard on "
            "torch_dist (megatron-core dist_checkpointing) and legacy per-rank torch "
            "checkpoints, in their own parallel layout, streaming with bounded memory; run it "
            "with torchrun to split the work over several processes."
        ),
        EPILOG,
    )
    src = p.add_argument_group("inputs (give --inputs or --load-dir)")
    which = src.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--inputs", nargs="+", metavar="DIR",
        help="checkpoint directories to merge (2 or more, one parallel layout); ordered by "
        "iteration when known, else taken oldest first as given",
    )
    which.add_argument(
        "--load-dir", metavar="DIR",
        help="a checkpoint root: pick the newest window of complete checkpoints from their "
        "wsm_manifest.json (see --window-iters, --window-tokens, --count)",
    )
    add_window_flags(src)
    src.add_argument(
        "--allow-no-manifest", action="store_true",
        help="accept checkpoints without wsm_manifest.json that are not recognised as complete "
        "Megatron-LM checkpoints (other tools' torch_dist or legacy checkpoints, or a Megatron-LM "
        "checkpoint its save directory's tracker does not vouch for, e.g. copied out of it); "
        "they are then checked through their files and common state only. Complete Megatron-LM "
        "checkpoints (consistent files, common state at the iteration of their iter_N name, "
        "committed by latest_checkpointed_iteration.txt) need no flag",
    )

    w = p.add_argument_group("weights (give --method or --weights)")
    # --method, --alpha, --min-lr-ratio, --final-ratio, --weights | --decay, --allow-negative,
    # --convention, --sampling: the same flags as every tool that takes a merge method.
    MergeMethod.add_cli_flags(w)
    w.add_argument(
        "--positions-from", choices=POSITION_UNITS, default="iteration",
        help="where the checkpoints sit for --method: their iteration (default) or consumed "
        "tokens from the manifests, or their index (even spacing assumed); an input lacking "
        "the number falls back to index, with a note",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--save", metavar="DIR", help="the merged checkpoint directory (created atomically)"
    )
    o.add_argument(
        "--output-dtype", choices=OUTPUT_DTYPES, default="same",
        help="dtype of the averaged tensors: as the inputs (default), fp32 or bf16",
    )
    o.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --save that is a merged checkpoint written by this tool "
        "(anything else is refused)",
    )
    o.add_argument(
        "--dry-run", action="store_true",
        help="check the inputs and print inputs, coefficients, implied decay and bytes to "
        "read/write; write nothing",
    )
    o.add_argument(
        "--chunk-mb", type=float, default=DEFAULT_CHUNK_MB,
        help=f"streaming-buffer budget per merge process in MiB (default {DEFAULT_CHUNK_MB}); "
        "bounds the merge's memory whatever the model size",
    )
    o.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar on rank 0")
    o.add_argument("--json", action="store_true", help="print the report as JSON (rank 0)")
    o.add_argument(
        "--distributed-backend", default="gloo",
        help="process-group backend under torchrun (default gloo: the merge runs on CPUs)",
    )
    o.add_argument(
        "--distributed-timeout-minutes", type=float, default=30.0,
        help="collective timeout under torchrun (default 30)",
    )
    return p


def add_window_flags(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The ``--load-dir`` window options (``--window-iters``, ``--window-tokens``, ``--count``,
    ``--skip-incomplete``), shared with ``evaluate.py --load-dir``; read them back with
    :func:`window_options`."""
    group.add_argument(
        "--window-iters", type=int, metavar="N",
        help="with --load-dir: checkpoints with iteration >= newest - N (the oldest anchors "
        "the window: N/interval + 1 checkpoints)",
    )
    group.add_argument(
        "--window-tokens", type=int, metavar="N",
        help="with --load-dir: checkpoints with consumed tokens >= newest - N",
    )
    group.add_argument(
        "--count", type=int, metavar="K",
        help="with --load-dir: at most the newest K checkpoints (all of the window by default)",
    )
    group.add_argument(
        "--skip-incomplete", action="store_true",
        help="with --load-dir: leave out unfinished checkpoints (complete: false, no manifest, "
        ".tmp-iter_*) inside the window instead of refusing; needs --positions-from iteration "
        "or tokens, so the coefficients see the gap (the report lists what was skipped)",
    )


def window_options(args: argparse.Namespace) -> dict[str, Any]:
    """The checked :func:`add_window_flags` values as ``choose_window`` keywords (ValueError
    for impossible ones)."""
    if args.skip_incomplete and args.positions_from == "index":
        raise ValueError(
            "--skip-incomplete needs --positions-from iteration or tokens: with index positions "
            "the checkpoints around a skipped one would be weighted as if evenly spaced"
        )
    if args.count is not None and args.count < 2:
        raise ValueError(f"--count {args.count}: give at least 2 (leave it out for the whole "
                         "window)")
    for name, value in (("--window-iters", args.window_iters),
                        ("--window-tokens", args.window_tokens)):
        if value is not None and value < 0:
            raise ValueError(f"{name} {value}: must be >= 0")
    return {
        "window_iters": args.window_iters,
        "window_tokens": args.window_tokens,
        "count": args.count,
        "skip_incomplete": args.skip_incomplete,
    }


#: Options whose value is a comma list that may start with a minus sign.
_LIST_OPTIONS = ("--weights", "--decay")


def join_negative_lists(argv: Sequence[str]) -> list[str]:
    """``--weights -0.5,0.7`` as ``--weights=-0.5,0.7``: argparse would take the leading ``-``
    of a comma list for an option (it only knows plain negative numbers)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in _LIST_OPTIONS and nxt is not None and nxt.startswith("-") and nxt[1:2] in (
            *"0123456789", "."
        ):
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def merge_method_of(args: argparse.Namespace) -> Any:
    """The MergeMethod of parsed weight flags (also ``evaluate.py --load-dir``'s): no
    --method means custom with --weights/--decay, else 1-sqrt; ValueError for two at once."""
    from megatron_wsm.coefficients import MergeMethod

    if args.method is not None and (args.weights is not None or args.decay is not None):
        raise ValueError("give only one of --method, --weights, --decay")
    return MergeMethod.from_cli(args)


def _coefficients(args: argparse.Namespace, positions: list[int]) -> tuple[list[float], Any]:
    """(c_0..c_k, the MergeMethod) of the parsed flags for checkpoints at ``positions``."""
    from megatron_wsm.merge import method_coefficients

    m = merge_method_of(args)
    return method_coefficients(m, positions, args.positions_from), m


def _inputs(args: argparse.Namespace) -> tuple[list[str], dict[str, Any] | None, list[str]]:
    """(input paths, the --load-dir selection for the provenance, notes)."""
    from megatron_wsm.merge import choose_window

    if args.inputs is not None:
        if any(x is not None for x in (args.window_iters, args.window_tokens, args.count)):
            raise ValueError("--window-iters/--window-tokens/--count need --load-dir")
        if args.skip_incomplete:
            raise ValueError("--skip-incomplete needs --load-dir")
        return list(args.inputs), None, []
    window = choose_window(args.load_dir, **window_options(args))
    skipped = [{"path": str(p), "iteration": it, "why": why} for p, it, why in window.skipped]
    selection = {
        "load_dir": args.load_dir,
        "window_iters": args.window_iters,
        "window_tokens": args.window_tokens,
        "count": args.count,
        "skipped_incomplete": skipped,
    }
    notes = [
        f"skipped unfinished checkpoint {row['path']} (iteration {row['iteration']}, "
        f"{row['why']}): the coefficients follow the remaining checkpoints' {args.positions_from}"
        for row in skipped
    ]
    return [str(p) for p in window.paths], selection, notes


def _init_distributed(args: argparse.Namespace) -> bool:
    """Join torchrun's process group when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    from megatron_wsm.process_guard import die_with_launcher

    die_with_launcher()  # a SIGKILLed torchrun must not leave merge ranks in collectives
    if not dist.is_initialized():
        dist.init_process_group(
            backend=args.distributed_backend,
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
    return True


def _print_report(report: Any, rule: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({**report.__dict__, "coefficient_rule": rule}, indent=2, default=str))
        return
    print(report.summary())
    print("  inputs (oldest first):")
    for row in report.inputs:
        tokens = row["consumed_tokens"]
        print(
            f"    c={row['coefficient']:.6f}  iter={row['iteration']}  "
            f"tokens={tokens if tokens is not None else '?'}  {row['path']}"
        )
    print("  coefficients: " + ", ".join(f"{c:.6f}" for c in report.coefficients))
    print("  implied decay w_1..w_k: " + ", ".join(f"{w:.6f}" for w in report.implied_decay))
    for line in rule_lines(rule, [row["path"] for row in report.inputs]):
        print(f"  {line}")
    if report.dry_run:
        mib = report.buffer_bytes_per_rank / 2**20
        print(f"  streaming buffers per merge process: <= {mib:.0f} MiB")


def rule_lines(rule: dict[str, Any], paths: Sequence[str]) -> list[str]:
    """How the coefficients were derived, as printed: convention, positions, weight-0 inputs."""
    spacing = "evenly spaced" if rule["evenly_spaced"] else "unevenly spaced"
    lines = [
        f"convention: {rule['convention']}, sampling {rule['sampling']}: "
        f"{rule['discretisation']}",
        f"positions ({rule['position_unit']}): "
        + ", ".join(str(p) for p in rule["positions"]) + f" ({spacing})",
    ]
    zeros = rule["zero_weight_inputs"]
    if zeros:
        named = ", ".join(f"input {j} ({paths[j]})" for j in zeros)
        lines.append(f"weight 0 (not read): {named}")
    lines.extend(f"why: {note}" for note in rule["notes"])
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the merge tool; returns the process exit code (0 ok, 2 refused or bad arguments).

    Under torchrun (WORLD_SIZE > 1) it does not return: after the process group is torn down
    the process ends with that exit code (see :func:`_teardown_and_exit`).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_lists(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help and usage errors: argparse's own exit codes
        return int(e.code or 0)
    if args.save is None and not args.dry_run:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: --save is required (or --dry-run)", file=sys.stderr)
        return 2
    if not _init_distributed(args):
        return _run(args, 0)
    import torch.distributed as dist

    rc = 1
    try:
        rc = _run(args, dist.get_rank())
    except KeyboardInterrupt:
        rc = 130
    except BaseException:  # noqa: BLE001 - reported here: the process ends without unwinding
        traceback.print_exc()
        rc = 1
    _teardown_and_exit(rc)
    return rc  # not reached


def _teardown_and_exit(rc: int) -> NoReturn:
    """Leave the process group and end this torchrun worker with ``rc``, skipping interpreter
    finalisation.

    Why not a plain return: gloo's worker threads drop the last reference to a finished
    collective (e.g. the broadcast of the merge's final result, held by the final barrier)
    *after* ``wait()`` has returned, and the tensors of object collectives are owned by Python
    objects, so dropping them takes the GIL. If that happens while the interpreter finalises,
    the worker thread is ended by ``pthread_exit`` and the forced unwind through a ``noexcept``
    destructor calls ``std::terminate`` ("terminate called without an active exception",
    SIGABRT, ~1 run in 30). ``destroy_process_group`` does not join those threads here, because
    the process group object stays referenced from C++ once ``torch._dynamo`` has been imported
    (lazily, after ``init_process_group``), so only not finalising is deterministic. The merged
    checkpoint is already fsynced; stdio and logging are flushed by hand.
    """
    import logging

    import torch.distributed as dist

    if dist.is_initialized():
        if rc == 0:
            # Every rank leaves its last collective before any tears gloo down: a peer gone
            # mid-operation makes the other rank fail.
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(rc)


def _run(args: argparse.Namespace, rank: int) -> int:
    from megatron_wsm.merge import (
        MergeError,
        describe_coefficients,
        input_positions,
        merge_checkpoints,
    )

    try:
        paths, selection, notes = _inputs(args)
        where = input_positions(
            paths, positions_from=args.positions_from, allow_no_manifest=args.allow_no_manifest
        )
        coefs, merge_method = _coefficients(args, where.positions)
        rule = describe_coefficients(
            coefs, method=merge_method.method, positions=where.positions, unit=where.unit,
            convention=merge_method.convention, sampling=merge_method.sampling,
        )
        # The provenance: the method's own fields, then how it met these checkpoints.
        method: dict[str, Any] = merge_method.to_json()
        method["k"] = len(coefs) - 1
        method["positions_from"] = args.positions_from
        method["coefficient_rule"] = rule
        if selection is not None:
            method["selection"] = selection
        report = merge_checkpoints(
            where.paths,
            coefs,
            args.save,
            output_dtype=args.output_dtype,
            chunk_mb=args.chunk_mb,
            overwrite=args.overwrite,
            allow_no_manifest=args.allow_no_manifest,
            allow_negative=args.allow_negative,
            method=method,
            progress=not args.no_progress_bar,
            dry_run=args.dry_run,
            protected=[args.load_dir] if args.load_dir is not None else [],
            notes=[*where.notes, *notes],
        )
    except (MergeError, ValueError) as e:
        if rank == 0:
            print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if report.dry_run:
        report.buffer_bytes_per_rank = int(args.chunk_mb * 2**20)
    if rank == 0:
        _print_report(report, rule, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
