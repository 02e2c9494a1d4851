"""Which optimizer state a full checkpoint holds, and whether it loads into this run (pure).

The plain optimizer and megatron-core's distributed optimizer store different state; the
distributed one is saved ``dp_reshardable`` or ``fully_reshardable`` (:data:`OPTIM_SHARDINGS`).
:func:`optimizer_record` is what a save records (manifest ``extra``, content metadata) and
:func:`optimizer_load_problem` why a resume cannot load it. Used by
:class:`megatron_wsm.checkpoint.manager.CheckpointManager`.
"""

from __future__ import annotations

from typing import Any

from megatron_wsm.checkpoint.manifest import ParallelLayout

#: Our key in megatron-core's content metadata: which optimizer wrote the state.
_CONTENT_OPTIMIZER = "wsm_optimizer"


#: How full checkpoints can store the distributed optimizer's state (megatron-core's names).
#: ``dp_reshardable``: each rank writes its own gradient-buffer buckets (fast; reloads with the
#: same TP/PP/EP/CP sizes, any DP size); ``fully_reshardable``: gathered per parameter
#: (slower saves; reloads into any layout).
OPTIM_SHARDINGS = ("dp_reshardable", "fully_reshardable")

#: The optimizer a full checkpoint's state came from (manifest ``extra``, content metadata).
OPTIMIZER_PLAIN = "plain"
OPTIMIZER_DISTRIBUTED = "distributed"


def optimizer_sharding_metadata(optim_sharding: str | None) -> dict[str, Any]:
    """megatron-core's ``sharded_state_dict`` metadata for the optimizer.

    ``None`` means the plain optimizer (no metadata: today's keys). Without explicit metadata
    the distributed optimizer picks ``fully_sharded_model_space``, which 0.16 cannot save.
    """
    if optim_sharding is None:
        return {}
    if optim_sharding not in OPTIM_SHARDINGS:
        raise ValueError(f"unknown optimizer sharding {optim_sharding!r}; use {OPTIM_SHARDINGS}")
    metadata: dict[str, Any] = {"distrib_optim_sharding_type": optim_sharding}
    if optim_sharding == "fully_reshardable":
        # Keys without the chained optimizers' ``chained_<i>.`` prefix: how many optimizers are
        # chained depends on the layout (EP > 1 adds one for the experts), the keys must not.
        metadata["chained_optim_avoid_prefix"] = True
    return metadata


#: Content-metadata keys megatron-core's ``sharded_state_dict`` methods read (Megatron-LM's
#: ``_build_sharded_state_dict_metadata`` writes them; its ``dp_cp_group`` is not saved).
MCORE_METADATA_KEYS = (
    "distrib_optim_sharding_type",
    "chained_optim_avoid_prefix",
    "singleton_local_shards",
)


def saved_optimizer_from_content(content: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`optimizer_record` of a checkpoint's writer from the content metadata
    megatron-core keeps with it (ours: our ``wsm_optimizer`` key; Megatron-LM's: a distributed
    optimizer exactly when ``distrib_optim_sharding_type`` is there), plus ``metadata``: the
    megatron-core metadata its optimizer keys were made with (:func:`load_metadata`)."""
    content = dict(content or {})
    sharding = content.get("distrib_optim_sharding_type")
    default = OPTIMIZER_DISTRIBUTED if sharding else OPTIMIZER_PLAIN
    return {
        "optimizer": content.get(_CONTENT_OPTIMIZER, default),
        "sharding": sharding,
        "metadata": load_metadata(content, sharding),
    }


def load_metadata(content: dict[str, Any] | None, sharding: str | None) -> dict[str, Any]:
    """The ``sharded_state_dict`` metadata that requests a checkpoint's optimizer keys: the
    megatron-core entries of its content metadata when it has any (Megatron-LM's plain
    optimizer: ``chained_optim_avoid_prefix`` drops the ``chained_N.`` prefix), else what our
    saves use for ``sharding`` (:func:`optimizer_sharding_metadata`)."""
    found = {k: v for k, v in (content or {}).items() if k in MCORE_METADATA_KEYS}
    return found if found else optimizer_sharding_metadata(sharding)


def optimizer_record(optim_sharding: str | None) -> dict[str, Any]:
    """What a full checkpoint records about its optimizer state (manifest and checkpoint)."""
    if optim_sharding is None:
        return {"optimizer": OPTIMIZER_PLAIN, "sharding": None}
    return {"optimizer": OPTIMIZER_DISTRIBUTED, "sharding": optim_sharding}


def _model_parallel_sizes(layout: ParallelLayout) -> dict[str, int]:
    return {
        "TP": layout.tensor_model_parallel_size,
        "PP": layout.pipeline_model_parallel_size,
        "EP": layout.expert_model_parallel_size,
        "CP": layout.context_parallel_size,
    }


def optimizer_load_problem(
    saved: dict[str, Any],
    optim_sharding: str | None,
    saved_layout: ParallelLayout | None,
    layout: ParallelLayout,
    optimizer_parts: int | None = None,
) -> str | None:
    """Why the optimizer state recorded as ``saved`` cannot load into this run, or None.

    ``saved`` is :func:`optimizer_record` of the writer. The plain and the distributed
    optimizer store different state. ``dp_reshardable`` state is the writer's gradient-buffer
    buckets: it loads with another DP size (the buckets of one model-parallel rank do not
    depend on it) but not with other TP/PP/EP/CP sizes; ``fully_reshardable`` loads anywhere
    megatron-core 0.16 can: not between layouts with a different number of chained optimizers
    (``optimizer_parts``; expert parallelism adds one for the experts' own DP group).
    """
    mine = optimizer_record(optim_sharding)["optimizer"]
    theirs = saved.get("optimizer", OPTIMIZER_PLAIN)
    saved_parts, parts = saved.get("parts"), optimizer_parts
    if theirs != mine:
        return (
            f"its optimizer state is from the {theirs} optimizer and this run uses the {mine} "
            "one (--use-distributed-optimizer must match the saving run)"
        )
    if (
        theirs == OPTIMIZER_DISTRIBUTED
        and saved.get("sharding") == "dp_reshardable"
        and saved_layout is not None
    ):
        before, now = _model_parallel_sizes(saved_layout), _model_parallel_sizes(layout)
        changed = [f"{k} {before[k]} -> {now[k]}" for k in before if before[k] != now[k]]
        if changed:
            return (
                "its distributed-optimizer state is dp_reshardable, which reloads only with "
                f"the same TP/PP/EP/CP sizes (changed: {', '.join(changed)}); resume with the "
                "saving layout, or save from a run with --dist-ckpt-optim-fully-reshardable"
            )
    known = saved_parts is not None and parts is not None
    if theirs == OPTIMIZER_DISTRIBUTED and known and saved_parts != parts:
        return (
            f"its distributed-optimizer state has {saved_parts} chained optimizer(s) and this "
            f"layout has {parts} (expert parallelism on one side only); megatron-core cannot "
            "reshard between them: resume with the saving TP/EP sizes"
        )
    return None


def _optimizer_parts(optimizer: Any) -> int:
    """How many optimizers megatron-core chained (dense and, with expert DP groups, experts)."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))
