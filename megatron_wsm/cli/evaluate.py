"""``tools/evaluate.py --load CKPT``: held-out loss, perplexity and MoE violations of a checkpoint.

The model and data settings are read from the checkpoint's manifest (its run config), so
comparing a stable, a merged and a decayed checkpoint is one command each. Any
``pretrain_moe.py`` flag given after ``--load`` overrides the manifest (e.g. ``--eval-iters``,
or the parallel layout: dist_checkpointing reshards on load).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from megatron_wsm.checkpointing import CheckpointError, resolve_load_dir
from megatron_wsm.config import RunConfig, TrainingConfig
from megatron_wsm.manifest import read_manifest


def config_from_run_info(run: dict[str, Any]) -> RunConfig:
    """The config that rebuilds the model and data a checkpoint was trained with.

    Only the model, the data and the seed are taken from the run: the layout, batch sizes and
    checkpointing of the training run do not apply to its evaluation. Grouped GEMM is a GPU-only
    speed option with the same checkpoint format, so it is off unless given again.
    """
    trained = RunConfig.from_json(run)
    model = dataclasses.replace(trained.model, moe_grouped_gemm=False)
    return RunConfig(
        model=model, data=trained.data, training=TrainingConfig(seed=trained.training.seed)
    )


def run_info_of(manifest: Any) -> dict[str, Any]:
    """A manifest's run info; for a manifest without one (a merge of checkpoints from an older
    version) the model shapes and the tokenizer's vocabulary."""
    run = manifest.extra.get("run")
    if run:
        return dict(run)
    model = {k: v for k, v in manifest.model_config.items() if k != "padded_vocab_size"}
    return {"model": model, "vocab_size": manifest.model_config.get("vocab_size")}


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate ``--load CKPT`` on the held-out split; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--load" not in argv:
        print(
            "usage: [torchrun ...] tools/evaluate.py --load CKPT [--output-json F] "
            "[--eval-iters N (default 0: the whole split)] [any pretrain_moe.py flag]\n\n"
            + (__doc__ or "")
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    ckpt = argv[argv.index("--load") + 1]
    try:
        manifest = read_manifest(resolve_load_dir(ckpt))
        base = config_from_run_info(run_info_of(manifest)) if manifest is not None else None
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_wsm.pretrain import main as pretrain_main

    # Default: the whole held-out split (comparable across checkpoints); --eval-iters overrides.
    return pretrain_main(["--eval-iters", "0", "--eval-only", "--no-progress-bar",
                          *argv], base)
