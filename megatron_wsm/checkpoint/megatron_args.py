"""The ``args`` entry Megatron-LM expects in a checkpoint's common state.

Megatron-LM keeps its whole command line (an ``argparse.Namespace``) in every checkpoint and
reads it back on ``--load``: ``consumed_train_samples`` / ``consumed_valid_samples`` give the
data position (without them a resume reads the data again from sample 0, with no error), the
model-shape and parallel fields are compared with the loading run (``check_checkpoint_args``)
or copied into it (``--use-checkpoint-args``). Our checkpoints carry such a Namespace, written
with Megatron-LM's field names and meanings, built here from the run's configuration.

Only plain values (``str``, ``int``, ``float``, ``bool``, ``None``) go in, so the entry loads
with ``torch.load(weights_only=True)`` plus ``argparse.Namespace`` alone — by our restricted
readers and by megatron-core's. Pure: no torch, no process group.
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron_wsm.lr_styles import DECAY_STYLES, WSD_DECAY_STYLES

#: Megatron-LM's ``--tokenizer-type`` for our own SentencePiece ``.model`` (no --tokenizer-type).
SENTENCEPIECE_TOKENIZER = "SentencePieceTokenizer"


#: ModelConfig fields that are not Megatron-LM ``args`` entries: ours alone, the negating
#: flags' own fields (Megatron-LM keeps only the positive one), and ``vocab_size`` (the
#: tokenizer's size with EOD here; Megatron-LM's --vocab-size is NullTokenizer's, set below).
_NOT_MEGATRON_LM_ARGS = frozenset(
    {
        "layout_independent_init",
        "params_dtype",
        "vocab_size",
        "tie_embeddings_and_output_weights",
        "no_swiglu",
        "disable_bias_linear",
        "no_position_embedding",
    }
)


def megatron_lm_args(
    run: dict[str, Any],
    *,
    iteration: int,
    consumed_samples: int,
    padded_vocab_size: int,
    parallel: dict[str, Any],
) -> argparse.Namespace:
    """The Namespace Megatron-LM's loader reads, from ``run`` (``RunConfig.to_json()``), the
    position and the layout (``ParallelLayout`` as a dict)."""
    model = run.get("model", {})
    training = run.get("training", {})
    optim = run.get("optim", {})
    data = run.get("data", {})
    par = run.get("parallel", {})
    num_experts = model.get("num_experts") or None
    heads = model.get("num_attention_heads")
    groups = model.get("num_query_groups")
    values: dict[str, Any] = {
        # the data position: Megatron-LM resumes its sampler here
        "iteration": iteration,
        "consumed_train_samples": consumed_samples,
        "skipped_train_samples": 0,
        # evaluation always reads the held-out split from its start here
        "consumed_valid_samples": 0,
        # The model: every ModelConfig field under its own name (Megatron-LM's names and
        # meanings, config/model.py), so check_checkpoint_args and --use-checkpoint-args read
        # what this model is; then the values Megatron-LM derives where ours say "default".
        **{k: v for k, v in model.items() if k not in _NOT_MEGATRON_LM_ARGS},
        "num_query_groups": groups or heads,
        "group_query_attention": bool(model.get("group_query_attention"))
        or (bool(groups) and groups != heads),
        "kv_channels": model.get("kv_channels")
        or ((model.get("hidden_size") // heads) if heads else None),
        "max_position_embeddings": model.get("max_position_embeddings") or model.get("seq_length"),
        # Megatron-LM's default (True) whatever the position embedding type; only
        # --no-position-embedding clears it, and its loader compares it with the command line.
        "add_position_embedding": not model.get("no_position_embedding", False),
        # What megatron-wsm's model fixes (megatron-core's defaults), written out so that
        # --use-checkpoint-args copies them instead of keeping its command line's.
        "rotary_interleaved": False,
        "squared_relu": False,
        "apply_query_key_layer_scaling": False,
        "num_experts": num_experts,
        "moe_router_topk": model.get("moe_router_topk") if num_experts else None,
        "moe_ffn_hidden_size": model.get("moe_ffn_hidden_size") if num_experts else None,
        "bf16": model.get("params_dtype") == "bf16",
        "fp16": model.get("params_dtype") == "fp16",
        # The weights are always stored under Transformer Engine's key names (whichever spec
        # ran), so a reader that goes by this value must pick TE's, not the writer's choice.
        "transformer_impl": "transformer_engine",
        # vocabulary and tokenizer
        "padded_vocab_size": padded_vocab_size,
        # Megatron-LM's --vocab-size is the NullTokenizer's size before EOD (else unset).
        "vocab_size": (
            data.get("vocab_size")
            if data.get("tokenizer_type") == "NullTokenizer"
            else model.get("vocab_size")
        ),
        "make_vocab_size_divisible_by": data.get("make_vocab_size_divisible_by", 128),
        "tokenizer_type": data.get("tokenizer_type") or SENTENCEPIECE_TOKENIZER,
        "tokenizer_model": data.get("tokenizer_model"),
        "vocab_file": data.get("vocab_file"),
        "merge_file": data.get("merge_file"),
        # Megatron-LM's --use-checkpoint-args copies it (TikTokenizer runs; None otherwise)
        "tiktoken_pattern": data.get("tiktoken_pattern"),
        # parallel layout of the writer
        "tensor_model_parallel_size": parallel.get("tensor_model_parallel_size", 1),
        "pipeline_model_parallel_size": parallel.get("pipeline_model_parallel_size", 1),
        "expert_model_parallel_size": parallel.get("expert_model_parallel_size", 1),
        "context_parallel_size": parallel.get("context_parallel_size", 1),
        "virtual_pipeline_model_parallel_size": None,
        "num_layers_per_virtual_pipeline_stage": None,
        "data_parallel_size": parallel.get("data_parallel_size", 1),
        "world_size": parallel.get("world_size", 1),
        "sequence_parallel": bool(par.get("sequence_parallel", False)),
        "use_distributed_optimizer": bool(par.get("use_distributed_optimizer", False)),
        "data_parallel_random_init": False,
        "ckpt_format": "torch_dist",
        "use_dist_ckpt": True,
        # batch and schedule
        "micro_batch_size": training.get("micro_batch_size"),
        "global_batch_size": training.get("global_batch_size"),
        "train_iters": training.get("train_iters"),
        "seed": training.get("seed"),
        "lr": optim.get("lr"),
        "min_lr": optim.get("min_lr"),
        "lr_decay_style": DECAY_STYLES.get(
            optim.get("lr_decay_style"), optim.get("lr_decay_style")
        ),
        "lr_wsd_decay_style": WSD_DECAY_STYLES.get(
            optim.get("lr_wsd_decay_style"), optim.get("lr_wsd_decay_style")
        ),
        "lr_wsd_decay_iters": optim.get("lr_wsd_decay_iters"),
        "lr_warmup_iters": optim.get("lr_warmup_iters"),
        "weight_decay": optim.get("weight_decay"),
        "clip_grad": optim.get("clip_grad"),
        "adam_beta1": optim.get("adam_beta1"),
        "adam_beta2": optim.get("adam_beta2"),
        "adam_eps": optim.get("adam_eps"),
    }
    return argparse.Namespace(**{k: _plain(v) for k, v in values.items()})


def _plain(value: Any) -> Any:
    """``value`` as a plain scalar, or a list of them (``--moe-layer-freq [0,1]``); anything
    else as its string: never a type to unpickle."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return list(value)
    return str(value)


# ----------------------------------------------------------------------------- reading back

#: Shape fields compared between a checkpoint's ``args`` and this run's model identity
#: (``CheckpointManager.identity``): same names and meanings in both. Others are left out:
#: ``vocab_size`` means the tokenizer's size before EOD in Megatron-LM's NullTokenizer
#: (``padded_vocab_size`` decides the shapes), and None means a derived default in ours.
_SHAPE_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "padded_vocab_size",
    "untie_embeddings_and_output_weights",
    "normalization",
    "position_embedding_type",
)


def shape_differences(args: Any, identity: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint, this run)}`` where a checkpoint's ``args`` (Megatron-LM's, or
    ours) describe another model than ``identity``; fields either side leaves unset (None)
    are not compared. Empty when ``args`` is not a Namespace."""
    if not isinstance(args, argparse.Namespace):
        return {}
    diff = {}
    for name in _SHAPE_ARGS:
        theirs, ours = getattr(args, name, None), identity.get(name)
        if name == "num_query_groups" and ours is None:
            ours = identity.get("num_attention_heads")  # ours: None = one group per head
        if theirs is None or ours is None:
            continue
        if theirs != ours:
            diff[name] = (theirs, ours)
    return diff


def parallel_layout_from_args(args: Any) -> dict[str, int] | None:
    """The writer's parallel sizes from a checkpoint's ``args`` (``ParallelLayout`` fields),
    None when ``args`` is not a Namespace or lacks the TP size."""
    if not isinstance(args, argparse.Namespace):
        return None
    if getattr(args, "tensor_model_parallel_size", None) is None:
        return None
    fields = (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
        "data_parallel_size",
        "world_size",
    )
    return {f: int(getattr(args, f, None) or 1) for f in fields}
