"""Checkpoints written by Megatron-LM's own trainer (``--ckpt-format torch_dist``), read by our
tools without a ``wsm_manifest.json``.

A Megatron-LM save directory holds ``iter_NNNNNNN/`` checkpoints and the tracker
``latest_checkpointed_iteration.txt``; each checkpoint's common state (``common.pt``, or the
embedded ``common_state`` item from megatron-core 0.19) carries the whole command line as an
``argparse.Namespace`` (``args``), the ``iteration`` and ``checkpoint_version``. This module:

- recognises such a checkpoint and says whether it is *complete* (:func:`recognise`): its
  torch_dist files are consistent (the ``.metadata`` names exactly the shard files present and
  they hold every byte range it names; ``metadata.json``, which megatron-core writes last, is
  there), its common state is readable by the restricted reader and names the iteration of its
  ``iter_N`` name, and Megatron-LM's tracker in its root has committed it (the tracker names
  this iteration or a later one: Megatron-LM writes the tracker after every rank finished);
- reads the data position and LR (``args.consumed_train_samples`` × ``seq_length``; the LR of
  the optimizer's parameter groups or of the scheduler), the parallel layout, and the model as
  our :class:`~megatron_wsm.config.RunConfig` (:func:`run_config_from_args`: Megatron-LM's
  ``--use-checkpoint-args``; every config field whose flag name is in ``args``, so new fields
  map by themselves, plus the special cases listed in :data:`SPECIAL_CASES`);
- builds the manifest our tools would have written (:func:`synthesized_manifest`; marked
  ``extra["megatron_lm"]``, never written to disk, never pruned by retention);
- names the key aliases between Megatron-LM's local spec and ours (:func:`megatron_lm_names`).

Pure where possible: torch is imported only to read the common state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint.files import checked_metadata
from megatron_wsm.checkpoint.manifest import (
    KIND_FULL,
    KIND_WINDOW,
    MANIFEST_NAME,
    CheckpointManifest,
    ParallelLayout,
    config_hash,
)

#: Megatron-LM's tracker file in a save directory (its ``--load`` reads it).
TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: The file megatron-core writes last in a finished torch_dist save (``save_config``).
MCORE_CONFIG_FILE = "metadata.json"
#: ``CheckpointManifest.extra`` key marking a manifest made here from a Megatron-LM checkpoint.
EXTRA_MEGATRON_LM = "megatron_lm"
_ITER_NAME = re.compile(r"^iter_(\d+)$")

# ----------------------------------------------------------------------------- key aliases

#: Our (TE) name → the name Megatron-LM's local spec (``--transformer-impl local``) writes. Its
#: MoE layers' ``sharded_state_dict_keys_map`` files the pre-MLP norm under ``mlp.linear_fc1``
#: (a TE spec, and megatron-wsm's, keep ``pre_mlp_layernorm``). Only MoE layers: in a dense
#: layer ``mlp.linear_fc1.layer_norm_weight`` is the fused norm under every spec.
KEY_ALIASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)pre_mlp_layernorm\.(weight|bias)$"), r"\1mlp.linear_fc1.layer_norm_\2"),
)
_REVERSE_ALIASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r"\1pre_mlp_layernorm.\2"),
)


def megatron_lm_names(key: str) -> list[str]:
    """The names Megatron-LM's local spec may store our ``key`` under (empty: none other)."""
    names = []
    for pattern, repl in KEY_ALIASES:
        new, n = pattern.subn(repl, key)
        if n:
            names.append(new)
    return names


def our_name(key: str, moe_layer: bool) -> str:
    """Our name of a key Megatron-LM's local spec wrote; ``moe_layer``: the key belongs to an
    MoE layer (where ``mlp.linear_fc1.layer_norm_*`` is the pre-MLP norm)."""
    if not moe_layer:
        return key
    for pattern, repl in _REVERSE_ALIASES:
        key = pattern.sub(repl, key)
    return key


# ----------------------------------------------------------------------------- the common state


def is_megatron_lm_state(common: Any) -> bool:
    """Whether a common state is Megatron-LM's trainer's: a dict with an ``args`` Namespace,
    an integer ``iteration`` and a ``checkpoint_version``."""
    return (
        isinstance(common, dict)
        and isinstance(common.get("args"), argparse.Namespace)
        and _is_int(common.get("iteration"))
        and isinstance(common.get("checkpoint_version"), (int, float))
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def consumed_samples(args: argparse.Namespace) -> int:
    """Training samples consumed (Megatron-LM keeps the data position in ``args`` only)."""
    value = getattr(args, "consumed_train_samples", None)
    return int(value) if _is_int(value) and value >= 0 else 0


def consumed_tokens(args: argparse.Namespace) -> int:
    """Training tokens consumed: samples × ``seq_length`` (Megatron-LM's samples are full
    sequences)."""
    seq = getattr(args, "seq_length", None)
    return consumed_samples(args) * (int(seq) if _is_int(seq) else 0)


def learning_rate(common: dict[str, Any]) -> float:
    """The LR at the checkpoint: the plain optimizer's first parameter group with
    ``lr_mult`` 1 (Megatron-LM's ``param_groups``), else the scheduler's when it is constant
    (``max_lr``), else 0.0 (unknown: a distributed optimizer keeps no LR in the common state)."""
    optimizer = common.get("optimizer")
    parts = (
        list(optimizer.values())
        if isinstance(optimizer, dict) and all(isinstance(k, int) for k in optimizer)
        else [optimizer]
    )
    for part in parts:
        groups = part.get("param_groups") if isinstance(part, dict) else None
        for group in groups or []:
            if isinstance(group, dict) and group.get("lr_mult", 1.0) == 1.0:
                lr = group.get("lr")
                if isinstance(lr, (int, float)):
                    return float(lr)
    sched = common.get("opt_param_scheduler")
    if isinstance(sched, dict) and sched.get("lr_decay_style") == "constant":
        steps, warmup = sched.get("num_steps", 0), sched.get("lr_warmup_steps", 0)
        if isinstance(sched.get("max_lr"), (int, float)) and steps >= warmup:
            return float(sched["max_lr"])
    return 0.0


def parallel_layout(args: argparse.Namespace) -> ParallelLayout:
    """The writer's parallel sizes (Megatron-LM's names are ours)."""
    values = {}
    for field in dataclasses.fields(ParallelLayout):
        value = getattr(args, field.name, None)
        if _is_int(value) and value >= 1:
            values[field.name] = value
    return ParallelLayout(**values)


# ----------------------------------------------------------------------------- args → RunConfig

#: Fields taken by name are those whose command-line destination is an ``args`` attribute; these
#: sections' fields are left at their defaults because they are this run's, not the model's
#: (paths, logging, process settings).
_NOT_FROM_ARGS = {
    "parallel": {"distributed_backend", "distributed_timeout_minutes", "ckpt_optim_sharding"},
    "training": {
        "save", "load", "save_interval", "save_keep_last", "exit_interval", "eval_only",
        "output_json", "tensorboard_dir", "progress_bar", "wandb_project", "wandb_exp_name",
        "wandb_save_dir", "wandb_entity", "no_load_optim", "no_load_rng", "finetune",
        "async_save", "moe_metrics",
    },
    "data": {"data_cache_dir", "data_cache_path", "num_dataset_builder_threads"},
    "model": {
        "vocab_size", "params_dtype", "kv_channels", "num_query_groups", "num_experts",
        "moe_grouped_gemm", "layout_independent_init", "moe_router_dtype",
        # a kernel choice of the writer's machine (Megatron-LM's --use-checkpoint-args does not
        # copy it either); the weights are the same either way
        "transformer_impl",
    },
}  # fmt: skip
#: The fields mapped by hand, and why (documentation; :func:`run_config_from_args`).
SPECIAL_CASES = {
    "model.params_dtype": "args.bf16 / args.fp16 (args.params_dtype is a torch dtype)",
    "model.vocab_size": "NullTokenizer: args.vocab_size + 1 (EOD); else unknown (None)",
    "model.num_experts": "None or 0 → None (dense)",
    "model.kv_channels": "None when hidden / heads (Megatron-LM always fills it in)",
    "model.num_query_groups": "only with args.group_query_attention (else one per head: None)",
    "model.position_embedding_type": "rope also when args.use_rotary_position_embeddings",
    "model.moe_grouped_gemm": "off: a GPU speed option with the same checkpoint keys",
    "model.moe_router_dtype": "args' value when fp32/fp64 (None: the model dtype, fp32 here)",
    "model.untie_embeddings_and_output_weights": "by name; the tie switch is its inverse",
}
_SECTIONS = ("model", "parallel", "optim", "data", "training")


def _args_name(field: dataclasses.Field) -> str:
    """The ``args`` attribute a field's flag fills in Megatron-LM (its ``dest``)."""
    meta = field.metadata
    if meta.get("dest"):
        return str(meta["dest"])
    flag = meta.get("flag", "")
    if isinstance(flag, str) and flag.startswith("--"):
        return flag[2:].replace("-", "_")
    return field.name


def _fits(value: Any, field: dataclasses.Field) -> bool:
    """Whether an ``args`` value has a type the field's annotation admits."""
    kinds = set(re.findall(r"[A-Za-z_]+", str(field.type)))
    plain = (str, int, float, bool)
    if value is None:
        return "None" in kinds or "Any" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool({"int", "float"} & kinds)
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    if isinstance(value, list):
        return "list" in kinds and all(isinstance(v, plain) for v in value)
    return False


def _by_name(cls: type, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in skip or field.metadata.get("flag", "") is None:
            continue
        name = _args_name(field)
        if field.metadata.get("convert") or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if _fits(value, field):
            values[field.name] = value
    return values


def run_config_from_args(args: argparse.Namespace) -> Any:
    """Our :class:`~megatron_wsm.config.RunConfig` for the model and run a Megatron-LM
    checkpoint's ``args`` describe (what Megatron-LM's ``--use-checkpoint-args`` copies, and
    more): every field of the model, parallel, optimizer, data and training sections whose
    flag is an ``args`` attribute of a fitting type, plus :data:`SPECIAL_CASES`.

    Raises:
        ConfigError: the values make no valid config (e.g. an unknown choice).
    """
    from megatron_wsm.config import SECTIONS, RunConfig

    sections = {
        name: _by_name(SECTIONS[name], args, _NOT_FROM_ARGS.get(name, set())) for name in _SECTIONS
    }
    model = sections["model"]
    heads = getattr(args, "num_attention_heads", None)
    hidden = getattr(args, "hidden_size", None)
    model["params_dtype"] = (
        "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False)
        else "fp32"
    )  # fmt: skip
    experts = getattr(args, "num_experts", None)
    model["num_experts"] = experts if _is_int(experts) and experts > 0 else None
    kv = getattr(args, "kv_channels", None)
    if _is_int(kv) and _is_int(heads) and _is_int(hidden) and kv != hidden // heads:
        model["kv_channels"] = kv
    groups = getattr(args, "num_query_groups", None)
    if getattr(args, "group_query_attention", False) and _is_int(groups):
        model["num_query_groups"] = groups
    if getattr(args, "use_rotary_position_embeddings", False):
        model["position_embedding_type"] = "rope"
    if getattr(args, "moe_router_dtype", None) in ("fp32", "fp64"):
        model["moe_router_dtype"] = args.moe_router_dtype
    if getattr(args, "tokenizer_type", None) == "NullTokenizer" and _is_int(
        getattr(args, "vocab_size", None)
    ):
        model["vocab_size"] = args.vocab_size + 1  # NullTokenizer: N ids + EOD
    model.pop("tie_embeddings_and_output_weights", None)
    if not _is_int(getattr(args, "vocab_size", None)):
        sections["data"].pop("vocab_size", None)
    return RunConfig.from_json(sections)


def padded_vocab_size(args: argparse.Namespace) -> int | None:
    """The embedding's rows (``args.padded_vocab_size``), None when absent."""
    value = getattr(args, "padded_vocab_size", None)
    return value if _is_int(value) and value > 0 else None


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's ``model_config`` (the model identity, as the trainer hashes it) for the
    model ``args`` describe."""
    from megatron_wsm.config.model import model_identity_fields

    cfg = run_config_from_args(args)
    ident = model_identity_fields(dataclasses.asdict(cfg.model))
    ident["padded_vocab_size"] = padded_vocab_size(args)
    return ident


# ----------------------------------------------------------------------------- recognition


@dataclasses.dataclass
class MegatronLMCheckpoint:
    """A torch_dist checkpoint directory without our manifest, as Megatron-LM wrote it."""

    path: Path
    #: The iteration of its common state (else of its ``iter_N`` name; -1 when neither says).
    iteration: int
    #: Its common state (None when unreadable: see ``problems``).
    common: dict[str, Any] | None
    #: Why it is not a complete Megatron-LM checkpoint (empty: it is one).
    problems: list[str]
    #: The common state was refused (unsafe, corrupt): reported like a corrupt manifest.
    unreadable: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def args(self) -> argparse.Namespace | None:
        return self.common.get("args") if self.common else None


def looks_like_megatron_lm(path: Path) -> bool:
    """Cheap test (no file read): a directory with torch_dist files and no manifest of ours."""
    return (
        path.is_dir()
        and not os.path.lexists(path / MANIFEST_NAME)
        and os.path.lexists(path / ckpt_integrity.METADATA_FILE)
    )


def read_tracker_text(root: Path) -> str | None:
    """The stripped text of ``root``'s tracker, None when there is none.

    Raises:
        ckpt_integrity.IntegrityError: not a regular file, or too big to be one.
    """
    tracker = root / TRACKER_FILE
    if not os.path.lexists(tracker):
        return None
    data = ckpt_integrity.read_regular(tracker, ckpt_integrity.MAX_TRACKER_BYTES)
    return data.decode("ascii", errors="replace").strip()


def tracker_problem(path: Path, iteration: int) -> str | None:
    """Why Megatron-LM's tracker in ``path``'s parent does not vouch for the checkpoint at
    ``iteration`` (None: it does). Megatron-LM writes the tracker after every rank finished a
    save, so a checkpoint newer than the tracker, or in a root without one, may be unfinished."""
    try:
        text = read_tracker_text(path.parent)
    except (ckpt_integrity.IntegrityError, OSError) as e:
        return f"its root's tracker is unusable: {e}"
    if text is None:
        return (
            f"no {TRACKER_FILE} in {path.parent}: Megatron-LM has not committed it (save "
            "unfinished, or copied out of its save directory)"
        )
    if text == "release":
        return None if path.name == "release" else f"the tracker says 'release', not {path.name}"
    if not text.isdigit():
        return f"its root's tracker holds {text[:40]!r}, not an iteration"
    if int(text) < iteration:
        return (
            f"its root's tracker names iteration {int(text)}, before this one ({iteration}): "
            "a save not finished (or not committed) by Megatron-LM"
        )
    tracked = path.parent / f"iter_{int(text):07d}"
    if tracked.is_symlink() or not tracked.is_dir():
        # Megatron-LM's --load of this root would fail: the tracker is not sane.
        return (
            f"its root's tracker names iteration {int(text)}, but {tracked.name} is missing (or "
            "a symlink): not a save directory Megatron-LM itself can load"
        )
    return None


def _file_problems(path: Path) -> list[str]:
    """The torch_dist files: consistent with ``.metadata`` both ways, ``metadata.json`` there."""
    metadata, problems = checked_metadata(path)
    if problems:
        return problems
    if metadata is None:  # not torch_dist: say why in the loader's words
        try:
            metadata = ckpt_integrity.load_metadata(path)
        except ckpt_integrity.IntegrityError as e:
            return [str(e)]
    named = set(ckpt_integrity.shard_files(metadata))
    present = {n for n in os.listdir(path) if n.endswith(ckpt_integrity.SHARD_SUFFIX)}
    extra = sorted(present - named)
    if extra:
        return [
            f"{path}: shard file(s) {', '.join(extra[:3])} not named by its .metadata "
            "(left from another save?)"
        ]
    if not os.path.lexists(path / MCORE_CONFIG_FILE):
        return [f"{path}: no {MCORE_CONFIG_FILE} (megatron-core writes it last: save unfinished)"]
    return []


def recognise(path: str | os.PathLike, *, need_tracker: bool = True) -> MegatronLMCheckpoint | None:
    """``path`` as a Megatron-LM checkpoint, or None when it is not one (ours, with a manifest;
    not torch_dist; a readable common state that is not Megatron-LM's trainer's).

    ``need_tracker``: completeness also needs the root's tracker to vouch for it
    (:func:`tracker_problem`); without, the files and the common state alone decide (a
    checkpoint named explicitly with ``--allow-no-manifest``). Reads ``.metadata`` and the
    common state (small), no tensor data."""
    path = Path(path)
    if not looks_like_megatron_lm(path):
        return None
    match = _ITER_NAME.match(path.name)
    named = int(match.group(1)) if match else None
    problems = _file_problems(path)
    try:
        common = ckpt_common.read_common_state(path)
    except (ckpt_common.CommonStateError, ckpt_integrity.IntegrityError) as e:
        return MegatronLMCheckpoint(
            path, named if named is not None else -1, None, [*problems, str(e)], unreadable=True
        )
    if not is_megatron_lm_state(common):
        return None
    iteration = int(common["iteration"])
    if named is not None and named != iteration:
        problems.append(
            f"{path.name} names iteration {named} but its common state says {iteration}: a "
            "renamed or copied checkpoint of another iteration"
        )
    if need_tracker and not problems:
        problem = tracker_problem(path, iteration)
        if problem:
            problems.append(problem)
    return MegatronLMCheckpoint(path, iteration, common, problems)


def synthesized_manifest(ckpt: MegatronLMCheckpoint) -> CheckpointManifest:
    """The manifest our trainer would have written for a recognised Megatron-LM checkpoint:
    kind ``full`` when it holds optimizer state, else ``window`` (model only); position, LR,
    layout and model from its common state. ``extra["megatron_lm"]`` marks it (never written,
    never pruned) and ``extra["run"]`` holds :func:`run_config_from_args` (None when the args
    make no valid config: the tools that need the model then say why)."""
    common = ckpt.common or {}
    args = common.get("args")
    assert isinstance(args, argparse.Namespace)
    content = common.get("content_metadata") or {}
    optimizer = "optimizer" in common
    try:
        run = run_config_from_args(args).to_json()
        model = model_config(args)
        problem = None
    except ValueError as e:  # ConfigError
        run, model, problem = None, {}, str(e)
    mcore = getattr(args, "megatron_core_version", None)  # absent in 0.16
    extra: dict[str, Any] = {
        EXTRA_MEGATRON_LM: {
            "checkpoint_version": common.get("checkpoint_version"),
            "optimizer": (
                "distributed" if "distrib_optim_sharding_type" in content
                else "plain" if optimizer else None
            ),
            "sharding": content.get("distrib_optim_sharding_type"),
            "transformer_impl": getattr(args, "transformer_impl", None),
            "config_problem": problem,
        },
    }  # fmt: skip
    if run is not None:
        extra["run"] = run
    return CheckpointManifest(
        kind=KIND_FULL if optimizer else KIND_WINDOW,
        iteration=ckpt.iteration,
        consumed_samples=consumed_samples(args),
        consumed_tokens=consumed_tokens(args),
        learning_rate=learning_rate(common),
        parallel=parallel_layout(args),
        model_config_hash=config_hash(model) if model else "",
        model_config=model,
        checkpoint_format="torch_dist",
        megatron_core_version=str(mcore) if isinstance(mcore, str) else "",
        model_spec={"transformer_impl": getattr(args, "transformer_impl", None),
                    "key_scheme": "megatron-lm"},
        complete=ckpt.complete,
        created_unix=0.0,
        extra=extra,
    )  # fmt: skip


def is_synthesized(manifest: CheckpointManifest | None) -> bool:
    """Whether a manifest was made here from a Megatron-LM checkpoint (not read from disk)."""
    return manifest is not None and EXTRA_MEGATRON_LM in manifest.extra


def manifest_of(path: str | os.PathLike) -> CheckpointManifest | None:
    """The checkpoint's manifest for the tools that rebuild its model (evaluate, export): ours
    when it has one, else the one made from a Megatron-LM checkpoint's ``args``
    (``--use-checkpoint-args``); None when neither.

    Raises:
        ManifestError: our manifest is corrupt.
        ValueError: a Megatron-LM checkpoint that is not complete (the message says why).
    """
    from megatron_wsm.checkpoint.manifest import read_manifest

    manifest = read_manifest(path)
    if manifest is not None:
        return manifest
    found = recognise(path)
    if found is None:
        return None
    if not found.complete:
        raise ValueError(f"{path}: a Megatron-LM checkpoint, refused: {found.problems[0]}")
    return synthesized_manifest(found)
