"""Command-line flags (Megatron-LM names and meanings) → :class:`RunConfig`, plus validation.

Every flag is defined here, once. ``parse_run_config`` is the only place that looks at
``argparse`` output; the rest of the code receives the typed config.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from megatron_wsm.config import (
    DataConfig,
    ModelConfig,
    OptimizerSettings,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    WSMConfig,
)
from megatron_wsm.lr import DECAY_STYLES, WSD_DECAY_STYLES


class ConfigError(ValueError):
    """An invalid run configuration, reported as one clear line before anything starts."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pretrain_moe.py``."""
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description=(
            "Pretrain a Mixture-of-Experts GPT on megatron-core with Warmup-Stable-Merge. "
            "Run with torchrun for several processes; without --data-path it trains on the "
            "embedded corpus (Python's own documentation)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=64, help="model width")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="dense FFN width (4×hidden)")
    g.add_argument("--num-attention-heads", type=int, default=4, help="attention heads")
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups")
    g.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    g.add_argument(
        "--max-position-embeddings", type=int, default=None, help="default: --seq-length"
    )
    g.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (0: dense)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert FFN width")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts per token")
    g.add_argument(
        "--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall"
    )
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2, help="load-balancing loss")
    g.add_argument(
        "--moe-router-load-balancing-type",
        choices=["aux_loss", "seq_aux_loss", "none"],
        default="aux_loss",
    )
    g.add_argument("--bf16", action="store_true", help="bf16 params with fp32 master weights")
    g.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="run each layer's experts as one grouped GEMM (Transformer Engine, GPU only); "
        "checkpoints are the same as without",
    )
    g.add_argument(
        "--layout-independent-init",
        action="store_true",
        help="initialise weights identically for every TP/PP/EP layout (tests, small models)",
    )

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="required for MoE with TP > 1")
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="shard the optimizer state (fp32 main weights, Adam moments) over data-parallel ranks",
    )
    g.add_argument(
        "--dist-ckpt-optim-fully-reshardable",
        dest="ckpt_optim_sharding",
        action="store_const",
        const="fully_reshardable",
        default="dp_reshardable",
        help="save the distributed optimizer's state in a layout-independent form (gathered per "
        "parameter; slower saves) instead of its DP-sharded buckets",
    )
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="overlap the DP gradient reduce with the backward pass (megatron-core DDP)",
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="overlap the distributed optimizer's parameter all-gather with the forward pass "
        "(needs --use-distributed-optimizer and --overlap-grad-reduce)",
    )

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="LR at the end of a decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument(
        "--lr-decay-style",
        choices=sorted(DECAY_STYLES),
        default="stable",
        help="stable (= constant): warmup then peak LR to the end, for WSM; WSD: stable then "
        "a decay over --lr-wsd-decay-iters",
    )
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-style", choices=sorted(WSD_DECAY_STYLES), default="1-sqrt")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on --load, use the schedule given on this command line, not the checkpoint's "
        "(continue a stable run with a decay)",
    )
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        default=None,
        help="indexed dataset prefix (.bin/.idx, see tools/preprocess_data.py); "
        "default: the embedded corpus",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights of --data-path")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    g.add_argument("--data-cache-dir", default="data_cache", help="embedded corpus cache")
    g.add_argument("--vocab-size", type=int, default=4096, help="embedded tokenizer vocabulary")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="stop when the iteration is a multiple of N (a full checkpoint is saved first)",
    )
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=50, help="0: no periodic evaluation")
    g.add_argument(
        "--eval-iters", type=int, default=10, help="global batches per evaluation; 0: whole split"
    )
    g.add_argument("--eval-only", action="store_true", help="evaluate --load and exit")
    g.add_argument("--output-json", default=None, help="write final evaluation here")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument(
        "--no-moe-metrics", action="store_true", help="do not compute load-balance violations"
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory of full checkpoints")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument(
        "--save-keep-last", type=int, default=None, help="keep only the newest K full checkpoints"
    )
    g.add_argument("--load", default=None, help="checkpoint directory (or parent) to load")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument(
        "--finetune", action="store_true", help="load weights only and start at iteration 0"
    )
    g.add_argument("--async-save", action="store_true", help="full saves in the background")

    g = p.add_argument_group("WSM window checkpoints")
    g.add_argument("--wsm-interval", type=int, default=None, help="window save every N iters")
    g.add_argument("--wsm-interval-tokens", type=int, default=None, help="... or every N tokens")
    g.add_argument("--wsm-window", type=int, default=None, help="keep the last N iterations")
    g.add_argument("--wsm-window-tokens", type=int, default=None, help="... or the last N tokens")
    g.add_argument("--wsm-save", default=None, help="default: <save>/wsm_window")
    g.add_argument("--wsm-async", action="store_true", help="window saves in the background")
    return p


def _pick(ns: argparse.Namespace, cls: type) -> Any:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in fields})


def parse_run_config(argv: Sequence[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags into a :class:`RunConfig` (not yet validated against the world size)."""
    ns = build_parser().parse_args(argv)
    if ns.max_position_embeddings is None:
        ns.max_position_embeddings = ns.seq_length
    ns.params_dtype = "bf16" if ns.bf16 else "fp32"
    ns.progress_bar = not ns.no_progress_bar
    ns.moe_metrics = not ns.no_moe_metrics
    cfg = RunConfig(
        model=_pick(ns, ModelConfig),
        parallel=_pick(ns, ParallelConfig),
        optim=_pick(ns, OptimizerSettings),
        data=_pick(ns, DataConfig),
        training=_pick(ns, TrainingConfig),
        wsm=_pick(ns, WSMConfig),
    )
    if cfg.model.num_experts == 0:
        cfg.model.num_experts = None
    return cfg, ns


def validate(cfg: RunConfig, world_size: int, cuda: bool) -> None:
    """Raise :class:`ConfigError` with one clear message for an impossible configuration."""
    m, par, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, cp, ep = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
        par.expert_model_parallel_size,
    )
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
        if value < 1:
            raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {value}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by TP×PP×CP = {tp}×{pp}×{cp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes"
        )
    dp = world_size // model_parallel
    if m.num_experts:
        if m.num_experts % ep:
            raise ConfigError(
                f"--num-experts {m.num_experts} is not divisible by "
                f"--expert-model-parallel-size {ep}"
            )
        if (dp * cp) % ep:
            raise ConfigError(
                f"--expert-model-parallel-size {ep} must divide DP×CP = {dp * cp} "
                f"(world {world_size} / TP×PP = {tp * pp})"
            )
        if not 1 <= m.moe_router_topk <= m.num_experts:
            raise ConfigError(
                f"--moe-router-topk {m.moe_router_topk} must be in [1, {m.num_experts}]"
            )
        if tp > 1 and not par.sequence_parallel:
            raise ConfigError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    elif ep > 1:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    if par.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if cp > 1 and not cuda:
        raise ConfigError(
            "--context-parallel-size > 1 needs Transformer Engine attention (GPU); megatron-core's "
            "local attention does not support context parallelism"
        )
    if par.ckpt_optim_sharding != "dp_reshardable" and not par.use_distributed_optimizer:
        raise ConfigError("--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer")
    if m.num_layers % pp:
        raise ConfigError(
            f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
            f"{m.num_attention_heads}"
        )
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by TP {tp}"
        )
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError("--seq-length must not exceed --max-position-embeddings")
    if par.sequence_parallel and m.seq_length % tp:
        raise ConfigError(f"--seq-length {m.seq_length} must be divisible by TP {tp} with SP")
    per_step = t.micro_batch_size * dp
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size × "
            f"DP = {t.micro_batch_size} × {dp} = {per_step}"
        )
    if t.eval_iters < 0:
        raise ConfigError("--eval-iters must be >= 0 (0: the whole held-out split)")
    if t.train_iters < 1 and not t.eval_only:
        raise ConfigError("--train-iters must be >= 1")
    if t.save_interval is not None and t.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1")
    if t.save_interval and not t.save:
        raise ConfigError("--save-interval needs --save DIR")
    if t.save_keep_last is not None and t.save_keep_last < 1:
        raise ConfigError("--save-keep-last must be >= 1 (the newest checkpoint is always kept)")
    if t.eval_only and not t.load:
        raise ConfigError("--eval-only needs --load CHECKPOINT")
    w = cfg.wsm
    if w.wsm_interval is not None and w.wsm_interval_tokens is not None:
        raise ConfigError("give --wsm-interval or --wsm-interval-tokens, not both")
    if w.wsm_window is not None and w.wsm_window_tokens is not None:
        raise ConfigError("give --wsm-window or --wsm-window-tokens, not both")
    wsm_on = w.wsm_interval is not None or w.wsm_interval_tokens is not None
    if wsm_on and not (w.wsm_save or t.save):
        raise ConfigError("window checkpoints (--wsm-interval) need --wsm-save DIR or --save DIR")
    for flag, value in (
        ("--wsm-interval", w.wsm_interval),
        ("--wsm-interval-tokens", w.wsm_interval_tokens),
        ("--wsm-window", w.wsm_window),
        ("--wsm-window-tokens", w.wsm_window_tokens),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if (w.wsm_window is not None or w.wsm_window_tokens is not None) and not wsm_on:
        raise ConfigError("--wsm-window needs --wsm-interval (or --wsm-interval-tokens)")
    tokens_per_iter = t.global_batch_size * m.seq_length
    if w.wsm_interval_tokens is not None and w.wsm_interval_tokens % tokens_per_iter:
        raise ConfigError(
            f"--wsm-interval-tokens {w.wsm_interval_tokens} must be a multiple of the tokens "
            f"per iteration ({tokens_per_iter} = global batch × seq length)"
        )
    for path, flag in ((cfg.data.data_path, "--data-path"),):
        if path is not None and not (
            os.path.exists(path + ".bin") and os.path.exists(path + ".idx")
        ):
            raise ConfigError(f"{flag} {path}: {path}.bin / {path}.idx not found")
    if cfg.data.data_path is not None and cfg.data.tokenizer_model is None:
        raise ConfigError("--data-path needs --tokenizer-model (the model that made the data)")
    if cfg.data.tokenizer_model is not None and not os.path.isfile(cfg.data.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {cfg.data.tokenizer_model}: file not found")
    validate_accelerator_flags(cfg, cuda)
    try:
        from megatron_wsm.lr import scheduler_kwargs

        scheduler_kwargs(cfg.optim, max(t.train_iters, 1), t.global_batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def validate_accelerator_flags(cfg: RunConfig, cuda: bool, te: bool | None = None) -> None:
    """Refuse GPU-only performance flags where they cannot run (``te``: TE usable; probed
    when None)."""
    m, par = cfg.model, cfg.parallel
    if m.moe_grouped_gemm:
        if not m.num_experts:
            raise ConfigError("--moe-grouped-gemm needs --num-experts")
        if te is None:
            from megatron_wsm.model import transformer_engine_usable

            te = cuda and transformer_engine_usable()
        if not te:
            from megatron_wsm.model import GROUPED_GEMM_NEEDS_TE

            raise ConfigError(GROUPED_GEMM_NEEDS_TE)
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if par.overlap_param_gather and not par.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (megatron-core)")


def window_interval_iters(cfg: RunConfig) -> int | None:
    """Window-save interval in iterations (token flags converted), or None when off."""
    w = cfg.wsm
    if w.wsm_interval is not None:
        return w.wsm_interval
    if w.wsm_interval_tokens is not None:
        return w.wsm_interval_tokens // (cfg.training.global_batch_size * cfg.model.seq_length)
    return None
