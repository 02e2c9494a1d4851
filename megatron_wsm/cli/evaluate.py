"""``tools/evaluate.py --load CKPT``: held-out loss, perplexity and MoE violations of a checkpoint.

The model shape and data settings are read from the checkpoint's manifest, so comparing a
stable, a merged and a decayed checkpoint is one command each. Any ``pretrain_moe.py`` flag
given after ``--load`` overrides the manifest (e.g. ``--eval-iters``, or the parallel layout:
dist_checkpointing reshards on load).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from megatron_wsm.checkpointing import CheckpointError, resolve_load_dir
from megatron_wsm.manifest import read_manifest

#: ModelConfig field → pretrain_moe.py flag, for the fields a manifest records.
_MODEL_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "max_position_embeddings": "--max-position-embeddings",
    "num_experts": "--num-experts",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_router_topk": "--moe-router-topk",
}


def flags_from_manifest(run: dict[str, Any]) -> list[str]:
    """pretrain_moe.py flags that rebuild the model and data a checkpoint was trained with."""
    flags: list[str] = []
    model = run.get("model", {})
    for key, flag in _MODEL_FLAGS.items():
        if model.get(key) is not None:
            flags += [flag, str(model[key])]
    if run.get("seq_length"):
        flags += ["--seq-length", str(run["seq_length"])]
    if run.get("data_path"):
        flags += ["--data-path", run["data_path"], "--split", run.get("split", "969,30,1")]
    if run.get("tokenizer_model"):
        flags += ["--tokenizer-model", run["tokenizer_model"]]
    if run.get("vocab_size"):
        flags += ["--vocab-size", str(run["vocab_size"])]
    if run.get("seed") is not None:
        flags += ["--seed", str(run["seed"])]
    return flags


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
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base: list[str] = []
    if manifest is not None:
        run = manifest.extra.get("run")
        if not run:  # e.g. a merge of checkpoints from an older version: shapes only
            run = {
                "model": manifest.model_config,
                "vocab_size": manifest.model_config.get("vocab_size"),
            }
        base = flags_from_manifest(run)
    from megatron_wsm.pretrain import main as pretrain_main

    # Default: the whole held-out split (comparable across checkpoints); --eval-iters overrides.
    return pretrain_main([*base, "--eval-iters", "0", "--eval-only", "--no-progress-bar", *argv])
