"""``pretrain_moe.py``'s body: flags → data, model, checkpoints → train → evaluate.

Kept apart from ``training.py`` (the loop itself) so the loop can be driven by tests and
benchmarks without the command line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch

from megatron_wsm import distributed as wdist
from megatron_wsm.arguments import ConfigError, parse_run_config, validate
from megatron_wsm.callbacks import Callback
from megatron_wsm.checkpoint import lock as run_lock
from megatron_wsm.checkpoint.layout import holds_no_checkpoint
from megatron_wsm.checkpoint.manager import CheckpointError, CheckpointManager
from megatron_wsm.checkpoint.manifest import ParallelLayout
from megatron_wsm.checkpoint_callback import CheckpointCallback, window_save_dir
from megatron_wsm.config import RunConfig
from megatron_wsm.eval_set import eval_set
from megatron_wsm.log_callback import LogCallback, moe_console
from megatron_wsm.model import model_vocab_rows
from megatron_wsm.moe_metrics import ExpertLoadCallback, ExpertLoadTracker
from megatron_wsm.training import (
    Components,
    NonFiniteStepError,
    TrainState,
    build_model_and_optimizer,
    evaluate,
    print_rank0,
    train,
    write_json,
)

if TYPE_CHECKING:
    from megatron_wsm.data.prepare import PreparedData


def prepare_builtin_data(cfg: RunConfig) -> PreparedData:
    """The cached tokenizer and indexed datasets of ``--data-source`` (built on first use).

    Every rank calls this; the cache's file lock lets exactly one process build, and that one
    shows the progress bars (unless ``--no-progress-bar``).
    """
    from megatron_wsm.data.prepare import prepare_embedded_data, prepare_env_python_data

    d, t = cfg.data, cfg.training
    if d.data_source == "env-python":
        return prepare_env_python_data(
            d.data_cache_dir,
            vocab_size=d.vocab_size,
            seed=t.seed,
            max_bytes=d.data_max_bytes,
            progress=t.progress_bar,
        )
    return prepare_embedded_data(d.data_cache_dir, vocab_size=d.vocab_size, seed=t.seed)


def build_data(cfg: RunConfig) -> tuple[dict[str, Any], int, str]:
    """Tokenizer and train/valid/test GPTDatasets; returns (datasets, vocab size, description)."""
    from megatron_wsm.config.blends import megatron_num_samples
    from megatron_wsm.data.datasets import build_gpt_datasets, datasets_from_flags
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer
    from megatron_wsm.data.tokenizers import megatron_vocab_size, tokenizer_from_config

    t = cfg.training
    d = cfg.data
    if d.uses_builtin_corpus():
        # The built-in corpus (sample counts unchanged since the first release: the published
        # numbers depend on them). --eval-iters 0 = the whole held-out split, one pass (None:
        # GPTDataset's single epoch).
        held_out = t.eval_iters * t.global_batch_size if t.eval_iters > 0 else None
        num_samples = (max(t.train_iters, 1) * t.global_batch_size, held_out, held_out)
        prepared = prepare_builtin_data(cfg)
        tokenizer = SentencePieceTokenizer(prepared.tokenizer_model)
        train_ds, valid_ds, test_ds = build_gpt_datasets(
            prepared.train_prefix,
            prepared.valid_prefix,
            prepared.test_prefix,
            tokenizer,
            cfg.model.seq_length,
            t.seed,
            num_samples,
            path_to_cache=os.path.join(d.data_cache_dir, "index_cache"),
            # The model is called with attention_mask=None (causal mask type), so a dense
            # [1, S, S] mask per sample would be built for nothing.
            create_attention_mask=False,
        )
        source = f"{d.data_source} corpus (cache: {d.data_cache_dir})"
    else:
        # Megatron-LM's sample counts, so a blend's index is the one Megatron-LM reads.
        tokenizer = tokenizer_from_config(d)
        train_ds, valid_ds, test_ds = datasets_from_flags(
            d,
            tokenizer,
            cfg.model.seq_length,
            t.seed,
            megatron_num_samples(t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters),
        )
        source = d.describe_source()
    datasets = {"train": train_ds, "valid": valid_ds, "test": test_ds}
    for split in ("train", "valid"):  # the test split is not read by the trainer
        ds = datasets[split]
        if ds is None or len(ds) == 0:
            raise ConfigError(
                f"the {split} split of {source} is empty; adjust --split or give its data"
            )
    # The size Megatron-LM pads (its legacy tokenizer's; differs for SentencePieceTokenizer).
    return datasets, megatron_vocab_size(cfg.data.tokenizer_type, tokenizer), source


def _layout(cfg: RunConfig) -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        context_parallel_size=cfg.parallel.context_parallel_size,
        data_parallel_size=ps.get_data_parallel_world_size(),
        world_size=wdist.world_size(),
    )


#: Puts weights into a freshly built model instead of ``--load`` (``evaluate.py --load-dir``);
#: returns what :meth:`CheckpointManager.load` returns.
WeightsLoader = Callable[[Components, CheckpointManager], dict[str, Any]]


def save_dirs(cfg: RunConfig) -> list[Path]:
    """The directories this run writes checkpoints into (the window one only when it lies
    outside ``--save``)."""
    dirs: list[Path] = []
    for d in (cfg.training.save, window_save_dir(cfg)):
        if d is None:
            continue
        real = Path(d).resolve()
        if not any(real == kept or kept in real.parents for kept in dirs):
            dirs.append(real)
    return dirs


def hold_save_dirs(cfg: RunConfig) -> list[run_lock.RunLock]:
    """Rank 0 takes the trainer lock of every save directory (a collective: every rank raises
    CheckpointError, naming the holder, when another live trainer holds one)."""
    locks: list[run_lock.RunLock] = []
    error = ""
    if wdist.rank() == 0 and not cfg.training.eval_only:
        try:
            for directory in save_dirs(cfg):
                locks.append(run_lock.acquire(directory))
        except run_lock.SaveDirLocked as e:
            for lock in locks:
                lock.release()
            locks, error = [], str(e)
    verdict = wdist.all_gather_objects(error)[0]
    if verdict:
        raise CheckpointError(verdict)
    for lock in locks:
        if lock.note:
            print_rank0(f"note: {lock.directory}: {lock.note}")
    return locks


def _nothing_to_load(load: str) -> bool:
    """Rank 0's verdict (one for all ranks) on whether ``--load`` holds no checkpoint at all
    (:func:`checkpoint.layout.holds_no_checkpoint`: Megatron-LM then starts from scratch)."""
    found = holds_no_checkpoint(load) if wdist.rank() == 0 else None
    return bool(wdist.all_gather_objects(found)[0])


def setup(
    cfg: RunConfig, weights: WeightsLoader | None = None
) -> tuple[Components, CheckpointManager]:
    """Everything but the loop: process groups, the save directories' lock, data, model,
    optimizer, checkpoint loading."""
    # Needs no process group: a missing tokenizer package or file is refused before one starts.
    cfg.data.validate_tokenizer()
    wdist.init_distributed(cfg.parallel, cfg.training.seed)
    validate(cfg, wdist.world_size(), torch.cuda.is_available())
    locks = hold_save_dirs(cfg)  # before anything is built: a refusal costs nothing
    datasets, vocab, source = build_data(cfg)
    # A checkpoint read by a tool keeps its writer's rows (model/vocab.py), else Megatron-LM's
    # padding for this TP.
    padded = model_vocab_rows(
        vocab,
        cfg.parallel.tensor_model_parallel_size,
        cfg.data.make_vocab_size_divisible_by,
        cfg.data.padded_vocab_size,
    )
    cfg.model.vocab_size = vocab
    tconfig, model, optimizer, scheduler = build_model_and_optimizer(cfg, padded)
    comp = Components(cfg, tconfig, model, optimizer, scheduler, padded, datasets, TrainState())
    if cfg.training.moe_metrics and cfg.model.num_experts:
        comp.load_tracker = ExpertLoadTracker.for_model(model, tconfig)
    # The whole run config: tools/evaluate.py and the exporter rebuild the model and its data
    # from a checkpoint alone (RunConfig.from_json).
    run_info = cfg.to_json()
    manager = CheckpointManager(
        model,
        optimizer,
        scheduler,
        _layout(cfg),
        cfg.model.to_json(),
        padded,
        run_info,
        optim_sharding=(
            cfg.parallel.ckpt_optim_sharding if cfg.parallel.use_distributed_optimizer else None
        ),
    )
    manager.locks = locks
    t = cfg.training
    info = None
    if weights is not None:
        info = weights(comp, manager)
    elif t.load and not t.eval_only and _nothing_to_load(t.load):
        if t.exit_on_missing_checkpoint:
            raise CheckpointError(
                f"--load {t.load}: no checkpoint there (--exit-on-missing-checkpoint)"
            )
        print_rank0(
            f"note: --load {t.load}: no checkpoint there; starting from random initialization, "
            "as Megatron-LM does (--exit-on-missing-checkpoint stops instead)"
        )
    elif t.load:
        info = manager.load(
            t.load,
            load_optim=not (t.no_load_optim or t.eval_only),
            load_rng=not (t.no_load_rng or t.eval_only),
            finetune=t.finetune,
        )
    if info is not None:
        comp.loaded = info
        comp.state = TrainState(
            info["iteration"], info["consumed_samples"], info["consumed_tokens"]
        )
        print_rank0(
            f"loaded {info['kind']} checkpoint {info['path']} at iteration {info['iteration']}"
        )
    n_params = sum(p.numel() for p in model[0].parameters())
    print_rank0(
        f"megatron-wsm: world {wdist.world_size()} (TP {cfg.parallel.tensor_model_parallel_size}"
        f", PP {cfg.parallel.pipeline_model_parallel_size}, EP "
        f"{cfg.parallel.expert_model_parallel_size}), data: {source}, vocab {vocab} (padded "
        f"{padded}), params on rank 0: {n_params:,}"
    )
    return comp, manager


def run(cfg: RunConfig, weights: WeightsLoader | None = None) -> dict[str, Any]:
    """Train (or only evaluate) as configured; returns the final evaluation."""
    comp, manager = setup(cfg, weights)
    t = cfg.training
    # Which samples every evaluation reads (the same first ones each time; eval_set.py).
    vset = eval_set("valid", t.eval_iters, t.global_batch_size, len(comp.datasets["valid"]))
    print_rank0(f"evaluation set: {vset.describe()}")
    history: list[dict[str, Any]] = []
    readout = None
    if not t.eval_only:
        # The order is the loop's order of work at each point: the batch's expert counts
        # before the log line that reports them, the log before the saves (as Megatron-LM),
        # the readout's evaluations before their logging (a separate point), and at exit the
        # TensorBoard files closed before the wait for pending saves and the locks' release.
        callbacks: list[Callback] = [
            ExpertLoadCallback(),
            LogCallback(comp),
            CheckpointCallback(cfg, manager),
        ]
        if cfg.wsm.eval_methods:
            from megatron_wsm.readout_callback import ReadoutCallback

            readout = ReadoutCallback(cfg, manager)
            callbacks.append(readout)
        history = train(comp, callbacks)  # the checkpoint callback releases the locks
    result = evaluate(comp, "valid")
    result["train_history"] = history
    if readout is not None:
        result["wsm_readouts"] = readout.readouts
    result["iteration"] = comp.state.iteration
    result["consumed_tokens"] = comp.state.consumed_tokens
    result["checkpoint"] = t.load
    if comp.loaded and "merge" in comp.loaded:
        result["merge"] = comp.loaded["merge"]
    print_rank0(
        f"final validation | iteration {comp.state.iteration} | lm loss {result['loss']:.4f} "
        f"| ppl {result['perplexity']:.2f}" + moe_console(result.get("moe"))
    )
    if t.output_json:
        write_json(t.output_json, result)
    if t.tensorboard_dir:
        print_rank0(
            f"TensorBoard logs: {os.path.abspath(t.tensorboard_dir)}  "
            f"(tensorboard --logdir {t.tensorboard_dir})"
        )
    return result


def main(
    argv: Sequence[str] | None = None,
    base: RunConfig | None = None,
    weights: WeightsLoader | None = None,
) -> int:
    """Entry point; returns a process exit code (2 for a bad configuration or checkpoint).

    ``base``: the values of flags not given (tools/evaluate.py: the checkpoint's run);
    ``weights``: loads the model instead of ``--load`` (tools/evaluate.py --load-dir).
    """
    from megatron_wsm.wsm_readout import ReadoutError

    cfg, _ = parse_run_config(argv, base)
    try:
        run(cfg, weights)
    except (ConfigError, CheckpointError, ReadoutError) as e:
        if wdist.rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        wdist.destroy_distributed(barrier_first=False)
        return 2
    except NonFiniteStepError as e:  # raised on every rank alike (a collective check)
        if wdist.rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        wdist.destroy_distributed(barrier_first=False)
        return 3
    wdist.destroy_distributed()
    return 0
