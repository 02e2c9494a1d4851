"""``tools/evaluate.py --load CKPT``: held-out loss, perplexity and MoE violations of a checkpoint.

``tools/evaluate.py --load-dir WINDOW_DIR --method M`` evaluates the merge that
``tools/merge_wsm.py --load-dir WINDOW_DIR --method M`` would write, built in memory instead
(same window and weight options: ``--window-iters``, ``--window-tokens``, ``--count``,
``--weights``, ``--positions-from``, ...), on one or several processes, in any layout.

The model and data settings are read from the checkpoint's manifest (its run config; for a
checkpoint Megatron-LM wrote, from its ``args`` as ``--use-checkpoint-args`` does), so
comparing a stable, a merged and a decayed checkpoint is one command each. Any
``pretrain_moe.py`` flag given after ``--load`` overrides the manifest (e.g. ``--eval-iters``,
or the parallel layout: dist_checkpointing reshards on load; the vocabulary keeps the padding
the checkpoint was written with, whatever the TP size here).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint.manager import CheckpointError, resolve_load_dir
from megatron_wsm.checkpoint.megatron_lm import EXTRA_MEGATRON_LM, manifest_of
from megatron_wsm.config import RunConfig, TrainingConfig
from megatron_wsm.eval_set import mismatch_note, run_counts


def config_from_run_info(run: dict[str, Any]) -> RunConfig:
    """The config that rebuilds the model and data a checkpoint was trained with.

    Only the model, the data, the seed and the run's ``--train-iters`` and ``--eval-interval``
    are taken from the run: the latter two size the valid split as the run did (with this
    evaluation's ``--eval-iters`` and global batch; megatron-core reshuffles a split asked for
    more than one epoch, :mod:`megatron_wsm.eval_set`), so the run's validation samples are read
    when its ``--eval-iters`` and global batch are given. The layout, batch sizes and
    checkpointing of the training run do not apply to its evaluation. Grouped GEMM is a GPU-only
    speed option with the same checkpoint format, so it is off unless given again.
    """
    trained = RunConfig.from_json(run)
    model = dataclasses.replace(trained.model, moe_grouped_gemm=False)
    training = TrainingConfig(seed=trained.training.seed, **run_counts(trained.training))
    return RunConfig(model=model, data=trained.data, training=training)


def recorded_run_training(manifest: Any) -> TrainingConfig | None:
    """The training flags of the run that wrote a checkpoint, as its manifest recorded them;
    None for an old manifest without them (its defaults say nothing of the run) and for a
    Megatron-LM checkpoint (its trainer moves through the valid split from one evaluation to the
    next: no one set of its run to compare with)."""
    if manifest is None or EXTRA_MEGATRON_LM in manifest.extra:
        return None
    run_info = manifest.run_info()
    if not isinstance(run_info.get("training"), dict):
        return None
    return RunConfig.from_json(run_info).training


def sample_set_note(argv: Sequence[str], base: RunConfig, run: TrainingConfig) -> str | None:
    """:func:`~megatron_wsm.eval_set.mismatch_note` for this evaluation's flags (``argv`` as
    the trainer gets them) against the training run's; None when the flags do not parse (the
    trainer reports that, once: this parse prints nothing)."""
    from megatron_wsm.arguments import parse_run_config

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            here, _ = parse_run_config(argv, base)
    except (SystemExit, ValueError):
        return None
    return mismatch_note(run, here.training)


def config_from_manifest(manifest: Any) -> RunConfig:
    """:func:`config_from_run_info` of a checkpoint's manifest, with the embedding's rows the
    checkpoint was written with (its ``model_config``; Megatron-LM's ``args.padded_vocab_size``,
    which ``--use-checkpoint-args`` copies): the vocabulary padding depends on the writer's TP
    size, and the model read here, at any TP size, must have the stored global shapes."""
    cfg = config_from_run_info(manifest.run_info())
    recorded = manifest.model_config.get("padded_vocab_size")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        cfg.data.padded_vocab_size = recorded
    return cfg


def _merge_parser() -> argparse.ArgumentParser:
    """The window and weight options of ``--load-dir`` (the merge tool's own flags)."""
    from megatron_wsm.cli.merge_wsm import add_window_flags
    from megatron_wsm.coefficients import MergeMethod
    from megatron_wsm.merge import POSITION_UNITS

    p = argparse.ArgumentParser(prog="evaluate.py --load-dir", add_help=False)
    p.add_argument("--load-dir", required=True)
    add_window_flags(p)
    p.add_argument("--positions-from", choices=POSITION_UNITS, default="iteration")
    MergeMethod.add_cli_flags(p)
    return p


def _merged_loader(args: argparse.Namespace) -> Any:
    """The ``weights`` of :func:`megatron_wsm.pretrain.main`: the merge of the window, built in
    memory on every rank (its own shards, in this run's layout)."""
    from megatron_wsm.cli.merge_wsm import merge_method_of, window_options
    from megatron_wsm.training import print_rank0
    from megatron_wsm.wsm_readout import load_merged_weights, plan_window_merge

    method = merge_method_of(args)

    def load(comp: Any, manager: Any) -> dict[str, Any]:
        plan = plan_window_merge(
            args.load_dir, method, positions_from=args.positions_from, **window_options(args)
        )
        print_rank0(
            f"merging in memory ({method.method}): "
            + ", ".join(f"{c:.6f} x {p}" for p, c in zip(plan.paths, plan.coefficients))
        )
        load_merged_weights(manager.bare_model(), plan, **manager.window_reader())
        newest = manifest_of(Path(plan.newest_path))
        return {
            "iteration": newest.iteration if newest else 0,
            "consumed_samples": newest.consumed_samples if newest else 0,
            "consumed_tokens": newest.consumed_tokens if newest else 0,
            "kind": "merged (in memory)",
            "path": str(args.load_dir),
            "merge": plan.to_json(),
        }

    return load


def _newest_manifest(args: argparse.Namespace) -> Any:
    """The manifest of the newest checkpoint the window would take (the run to rebuild)."""
    from megatron_wsm.cli.merge_wsm import window_options
    from megatron_wsm.merge import choose_window, inspect_input

    selection = choose_window(args.load_dir, **window_options(args))
    for path in selection.paths:  # refused here, before any process group starts
        inspect_input(path)
    return manifest_of(selection.paths[-1])


def _checked_load(ckpt: str) -> Any:
    """The manifest of ``--load CKPT`` (None without one) after the checks a merge input gets
    (:func:`~megatron_wsm.checkpoint.layout.checkpoint_problems`): a FIFO or symlink in place
    of a checkpoint file,
    a missing or unreadable common state, an iteration the name, manifest and common state
    disagree on are refused here, before megatron-core reads a byte (it would block on a FIFO
    or fail with a traceback). Raises CheckpointError."""
    from megatron_wsm.checkpoint import layout as ckpt_layout

    path = resolve_load_dir(ckpt)
    try:
        manifest = manifest_of(path)  # ours, else from a Megatron-LM checkpoint's args
    except ValueError as e:
        raise CheckpointError(f"--load {path}: {e}") from e
    problems = ckpt_layout.checkpoint_problems(path, manifest)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"--load {path}: refusing it: {problems[0]}{more}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate ``--load CKPT`` (or the merge of ``--load-dir WINDOW``) on the held-out split;
    returns the exit code."""
    from megatron_wsm.merge import MergeError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or not ({"--load", "--load-dir"} & set(argv)):
        print(
            "usage: [torchrun ...] tools/evaluate.py --load CKPT [--output-json F] "
            "[--eval-iters N (default 0: the whole split)] [any pretrain_moe.py flag]\n"
            "   or: [torchrun ...] tools/evaluate.py --load-dir WINDOW_DIR [--method M | "
            "--weights C0,..] [--window-iters N | --window-tokens N] [--count K] "
            "[... as above]\n\n" + (__doc__ or "")
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    weights = None
    try:
        if "--load-dir" in argv:
            if "--load" in argv:
                raise ValueError("give --load CKPT or --load-dir WINDOW_DIR, not both")
            args, argv = _merge_parser().parse_known_args(argv)
            manifest = _newest_manifest(args)
            weights = _merged_loader(args)
            argv = ["--load", args.load_dir, *argv]
        else:
            manifest = _checked_load(argv[argv.index("--load") + 1])
        base = config_from_manifest(manifest) if manifest is not None else None
    except (CheckpointError, MergeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_wsm.pretrain import main as pretrain_main

    # Default: the whole held-out split (comparable across checkpoints); --eval-iters overrides.
    argv = ["--eval-iters", "0", "--eval-only", "--no-progress-bar", *argv]
    run = recorded_run_training(manifest)  # None: nothing recorded to compare with
    note = sample_set_note(argv, base, run) if base is not None and run is not None else None
    code = pretrain_main(argv, base, weights)
    if code == 0 and note and os.environ.get("RANK", "0") == "0":
        # Said last, beside the result: why it may differ from the run's logged validation.
        print(note, flush=True)
    return code
