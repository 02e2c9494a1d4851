"""Typed configuration of a training run: the single source of every ``pretrain_moe.py`` flag.

Each field carries its default and, in its metadata, its command-line flag (Megatron-LM's name:
``--tensor-model-parallel-size`` → ``tensor_model_parallel_size``), help text and choices;
``arguments.py`` generates the parser from these classes. No component reads a global ``args``.
Each class validates its own fields (``validate``); :meth:`RunConfig.validate` adds the checks
that need the world size. :meth:`RunConfig.to_json` is what a checkpoint's manifest records and
:meth:`RunConfig.from_json` rebuilds the run from it (tools that need the model back).

Field metadata keys (read by ``arguments.build_parser``):

* ``help``: help text; ``flag``: the option (default ``--`` + name with dashes; ``None``: no
  flag, set by the program); ``choices``: a list or a zero-argument callable returning one;
* ``group``: help-section title when it differs from the class's ``GROUP``;
* ``store_true`` flags whose value is not the field's own: ``dest`` (the namespace name) and
  ``convert`` (flag value → field value), e.g. ``--bf16`` → ``params_dtype``;
* ``const``: an option that stores this constant (``--dist-ckpt-optim-fully-reshardable``);
* ``shape``: the field decides parameter shapes or routing (hashed into checkpoint manifests).

Long on purpose: it is the one place every trainer flag is declared (six small section classes
with their own checks); splitting it would split the single source of configuration a newcomer
reads top to bottom. It imports the standard library and two small pure modules only
(``lr_styles``: the schedule names; ``accelerators``: the Transformer Engine probe, which imports
torch only when called), so the tools and tests that read a configuration never load
megatron-core.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from megatron_wsm.accelerators import GROUPED_GEMM_NEEDS_TE, transformer_engine_usable
from megatron_wsm.lr_styles import DECAY_STYLES, WSD_DECAY_STYLES


class ConfigError(ValueError):
    """An invalid run configuration, reported as one clear line before anything starts."""


def _f(default: Any = None, help: str | None = None, **meta: Any) -> Any:  # noqa: A002
    """A dataclass field with its default and command-line metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _bf16_dtype(flag: bool) -> str:
    return "bf16" if flag else "fp32"


def _negate(flag: bool) -> bool:
    return not flag


@dataclasses.dataclass
class ModelConfig:
    """Shape of the MoE GPT model."""

    GROUP = "model"

    num_layers: int = _f(2, "transformer layers", shape=True)
    hidden_size: int = _f(64, "model width", shape=True)
    ffn_hidden_size: int | None = _f(None, "dense FFN width (4×hidden)", shape=True)
    num_attention_heads: int = _f(4, "attention heads", shape=True)
    num_query_groups: int | None = _f(None, "GQA groups", shape=True)
    seq_length: int = _f(128, "tokens per sample")
    #: None → ``seq_length`` (filled in by ``__post_init__``, as the flag always did)
    max_position_embeddings: int | None = _f(None, "default: --seq-length", shape=True)
    num_experts: int | None = _f(4, "experts per MoE layer (0: dense)", shape=True)
    moe_ffn_hidden_size: int | None = _f(None, "expert FFN width", shape=True)
    moe_router_topk: int = _f(2, "experts per token", shape=True)
    moe_token_dispatcher_type: str = _f("alltoall", choices=["alltoall", "allgather"])
    moe_aux_loss_coeff: float = _f(1e-2, "load-balancing loss")
    moe_router_load_balancing_type: str = _f(
        "aux_loss", choices=["aux_loss", "seq_aux_loss", "none"]
    )
    params_dtype: str = _f(
        "fp32",
        "bf16 params with fp32 master weights",
        flag="--bf16",
        dest="bf16",
        convert=_bf16_dtype,
    )
    moe_grouped_gemm: bool = _f(
        False,
        "run each layer's experts as one grouped GEMM (Transformer Engine, GPU only); "
        "checkpoints are the same as without",
    )
    layout_independent_init: bool = _f(
        False, "initialise weights identically for every TP/PP/EP layout (tests, small models)"
    )
    #: Set from the tokenizer by the trainer; ``DataConfig.vocab_size`` is the flag.
    vocab_size: int | None = _f(None, flag=None, shape=True)
    position_embedding_type: str = _f("rope", flag=None, shape=True)
    normalization: str = _f("RMSNorm", flag=None, shape=True)
    untie_embeddings_and_output_weights: bool = _f(
        True,
        "share the input embedding with the output layer (Megatron-LM ties by default and "
        "unties with --untie-embeddings-and-output-weights; this project unties by default)",
        flag="--tie-embeddings-and-output-weights",
        dest="tie_embeddings_and_output_weights",
        convert=_negate,
        shape=True,
    )
    hidden_dropout: float = _f(0.0, flag=None)
    attention_dropout: float = _f(0.0, flag=None)
    init_method_std: float = _f(0.02, flag=None)

    def __post_init__(self) -> None:
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_experts == 0:  # the flag's "0: dense"
            self.num_experts = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict; its shape fields identify the model in checkpoint manifests."""
        return dataclasses.asdict(self)

    def validate(self, parallel: ParallelConfig, data_parallel_size: int, cuda: bool) -> None:
        """Own-field checks and those against the parallel layout (DP: ``data_parallel_size``)."""
        tp, pp, cp, ep = parallel.sizes()
        dp = data_parallel_size
        if self.num_experts:
            if self.num_experts % ep:
                raise ConfigError(
                    f"--num-experts {self.num_experts} is not divisible by "
                    f"--expert-model-parallel-size {ep}"
                )
            if (dp * cp) % ep:
                raise ConfigError(
                    f"--expert-model-parallel-size {ep} must divide DP×CP = {dp * cp} "
                    f"(world {dp * tp * pp * cp} / TP×PP = {tp * pp})"
                )
            if tp > 1 and not parallel.sequence_parallel:
                raise ConfigError(
                    "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel"
                )
        elif ep > 1:
            raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
        if self.num_layers % pp:
            raise ConfigError(
                f"--num-layers {self.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {pp}"
            )
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by TP {tp}"
            )
        if parallel.sequence_parallel and self.seq_length % tp:
            raise ConfigError(
                f"--seq-length {self.seq_length} must be divisible by TP {tp} with SP"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        assert self.max_position_embeddings is not None  # __post_init__
        if self.seq_length > self.max_position_embeddings:
            raise ConfigError("--seq-length must not exceed --max-position-embeddings")
        if self.num_experts and not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(
                f"--moe-router-topk {self.moe_router_topk} must be in [1, {self.num_experts}]"
            )
        self.validate_accelerator(cuda)

    def validate_accelerator(self, cuda: bool, te: bool | None = None) -> None:
        """GPU-only options (``te``: Transformer Engine usable; probed when None)."""
        if self.moe_grouped_gemm:
            if not self.num_experts:
                raise ConfigError("--moe-grouped-gemm needs --num-experts")
            if te is None:
                te = cuda and transformer_engine_usable()
            if not te:
                raise ConfigError(GROUPED_GEMM_NEEDS_TE)


@dataclasses.dataclass
class ParallelConfig:
    """How the model and data are split over ranks (Megatron semantics)."""

    GROUP = "parallelism"

    tensor_model_parallel_size: int = _f(1)
    pipeline_model_parallel_size: int = _f(1)
    expert_model_parallel_size: int = _f(1)
    context_parallel_size: int = _f(1)
    sequence_parallel: bool = _f(False, "required for MoE with TP > 1")
    use_distributed_optimizer: bool = _f(
        False,
        "shard the optimizer state (fp32 main weights, Adam moments) over data-parallel ranks",
    )
    #: how full checkpoints store the distributed optimizer's state (megatron-core's names):
    #: dp_reshardable | fully_reshardable
    ckpt_optim_sharding: str = _f(
        "dp_reshardable",
        "save the distributed optimizer's state in a layout-independent form (gathered per "
        "parameter; slower saves) instead of its DP-sharded buckets",
        flag="--dist-ckpt-optim-fully-reshardable",
        const="fully_reshardable",
    )
    #: None → nccl with CUDA, gloo without
    distributed_backend: str | None = _f(None, choices=["nccl", "gloo"])
    overlap_grad_reduce: bool = _f(
        False, "overlap the DP gradient reduce with the backward pass (megatron-core DDP)"
    )
    overlap_param_gather: bool = _f(
        False,
        "overlap the distributed optimizer's parameter all-gather with the forward pass "
        "(needs --use-distributed-optimizer and --overlap-grad-reduce)",
    )

    def sizes(self) -> tuple[int, int, int, int]:
        """(TP, PP, CP, EP)."""
        return (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
            self.expert_model_parallel_size,
        )

    def validate(self, world_size: int, cuda: bool) -> int:
        """Own-field checks against the world size; returns the data-parallel size."""
        tp, pp, cp, ep = self.sizes()
        for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
            if value < 1:
                raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {value}")
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP×PP×CP = {tp}×{pp}×{cp} = "
                f"{model_parallel}; launch a multiple of {model_parallel} processes"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if cp > 1 and not cuda:
            raise ConfigError(
                "--context-parallel-size > 1 needs Transformer Engine attention (GPU); "
                "megatron-core's local attention does not support context parallelism"
            )
        if self.ckpt_optim_sharding != "dp_reshardable" and not self.use_distributed_optimizer:
            raise ConfigError(
                "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"
            )
        self.validate_overlap()
        return world_size // model_parallel

    def validate_overlap(self) -> None:
        """The communication-overlap flags' prerequisites (megatron-core's)."""
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (megatron-core)")


@dataclasses.dataclass
class OptimizerSettings:
    """Adam hyper-parameters and the LR schedule."""

    GROUP = "optimizer and learning rate"

    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(0.0, "LR at the end of a decay")
    lr_warmup_iters: int = _f(0)
    lr_warmup_init: float = _f(0.0)
    lr_decay_style: str = _f(
        "stable",
        "stable (= constant): warmup then peak LR to the end, for WSM; WSD: stable then "
        "a decay over --lr-wsd-decay-iters",
        choices=sorted(DECAY_STYLES),
    )
    lr_decay_iters: int | None = _f(None, "default: --train-iters")
    #: linear | cosine | exponential | 1-sqrt (alias minus_sqrt)
    lr_wsd_decay_style: str = _f("1-sqrt", choices=sorted(WSD_DECAY_STYLES))
    lr_wsd_decay_iters: int | None = _f(None)
    weight_decay: float = _f(0.1)
    adam_beta1: float = _f(0.9)
    adam_beta2: float = _f(0.95)
    adam_eps: float = _f(1e-8)
    clip_grad: float = _f(1.0)
    override_opt_param_scheduler: bool = _f(
        False,
        "on --load, use the schedule given on this command line, not the checkpoint's "
        "(continue a stable run with a decay)",
    )
    use_checkpoint_opt_param_scheduler: bool = _f(False)

    def decay_iters(self, train_iters: int) -> int:
        """Iterations from the start to the end of the decay: ``--lr-decay-iters``, else
        ``--train-iters`` (Megatron-LM's default)."""
        return self.lr_decay_iters or train_iters

    def validate(self, train_iters: int) -> None:
        """The schedule must be one megatron-core's ``OptimizerParamScheduler`` accepts (the
        checks ``lr.scheduler_kwargs`` relies on, made here so that they need no megatron-core).
        """
        if self.lr_decay_style not in DECAY_STYLES:
            raise ConfigError(
                f"--lr-decay-style {self.lr_decay_style!r} unknown; "
                f"choose from {sorted(DECAY_STYLES)}"
            )
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(
                f"--lr-wsd-decay-style {self.lr_wsd_decay_style!r} unknown; "
                f"choose from {sorted(WSD_DECAY_STYLES)}"
            )
        decay_iters = self.decay_iters(train_iters)
        warmup_iters = self.lr_warmup_iters
        if warmup_iters >= decay_iters:
            raise ConfigError(
                f"--lr-warmup-iters ({warmup_iters}) must be smaller than the decay length "
                f"({decay_iters} iterations: --lr-decay-iters or --train-iters)"
            )
        if DECAY_STYLES[self.lr_decay_style] == "WSD":
            wsd_iters = self.lr_wsd_decay_iters
            if wsd_iters is None or wsd_iters <= 0 or wsd_iters > decay_iters - warmup_iters:
                raise ConfigError(
                    "--lr-decay-style WSD needs --lr-wsd-decay-iters N with 0 < N <= "
                    f"{decay_iters - warmup_iters} (decay length minus warmup)"
                )
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")


#: Built-in corpora selectable with ``--data-source`` (``megatron_wsm.data``: ``corpus.py``,
#: ``env_python.py``).
DATA_SOURCES = ("embedded", "env-python")


@dataclasses.dataclass
class DataConfig:
    """Where training tokens come from."""

    GROUP = "data"

    data_path: str | None = _f(
        None,
        "indexed dataset prefix (.bin/.idx, see tools/preprocess_data.py); "
        "default: the embedded corpus",
    )
    split: str = _f("969,30,1", "train,valid,test weights of --data-path")
    tokenizer_model: str | None = _f(None, "sentencepiece .model file")
    data_cache_dir: str = _f("data_cache", "embedded corpus cache")
    vocab_size: int = _f(4096, "embedded tokenizer vocabulary")
    data_source: str = _f(
        "embedded",
        "built-in corpus without --data-path: embedded (CPython's help topics and docstrings, "
        "1.5 MB) or env-python (the .py files of this interpreter's stdlib and site-packages, "
        "hundreds of MB; pass e.g. --vocab-size 16384; built once into --data-cache-dir)",
        choices=list(DATA_SOURCES),
    )
    data_max_bytes: int | None = _f(
        None,
        "env-python: use only the first files of its selection, up to this many bytes of text "
        "(a quick slice); default: all",
    )

    def validate(self) -> None:
        """The dataset and tokenizer files exist and belong together; the built-in corpus
        options are consistent."""
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(
                f"--data-source {self.data_source!r}: choose one of {', '.join(DATA_SOURCES)}"
            )
        if self.data_path is not None and self.data_source != "embedded":
            raise ConfigError(
                f"--data-source {self.data_source} selects a built-in corpus; --data-path "
                "replaces it (give one of the two)"
            )
        if self.data_max_bytes is not None:
            if self.data_source != "env-python":
                raise ConfigError("--data-max-bytes applies to --data-source env-python only")
            if self.data_max_bytes <= 0:
                raise ConfigError(f"--data-max-bytes must be positive, got {self.data_max_bytes}")
        path = self.data_path
        if path is not None and not (
            os.path.exists(path + ".bin") and os.path.exists(path + ".idx")
        ):
            raise ConfigError(f"--data-path {path}: {path}.bin / {path}.idx not found")
        if path is not None and self.tokenizer_model is None:
            raise ConfigError("--data-path needs --tokenizer-model (the model that made the data)")
        if self.tokenizer_model is not None and not os.path.isfile(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {self.tokenizer_model}: file not found")


@dataclasses.dataclass
class TrainingConfig:
    """Loop length, batch sizes, logging, evaluation and checkpointing."""

    GROUP = "training"

    micro_batch_size: int = _f(4)
    global_batch_size: int = _f(8)
    train_iters: int = _f(100)
    exit_interval: int | None = _f(
        None, "stop when the iteration is a multiple of N (a full checkpoint is saved first)"
    )
    seed: int = _f(1234)
    log_interval: int = _f(10)
    eval_interval: int = _f(50, "0: no periodic evaluation")
    eval_iters: int = _f(10, "global batches per evaluation; 0: whole split")
    eval_only: bool = _f(False, "evaluate --load and exit")
    output_json: str | None = _f(None, "write final evaluation here")
    tensorboard_dir: str | None = _f(None)
    progress_bar: bool = _f(
        True, None, flag="--no-progress-bar", dest="no_progress_bar", convert=_negate
    )
    moe_metrics: bool = _f(
        True,
        "do not compute load-balance violations",
        flag="--no-moe-metrics",
        dest="no_moe_metrics",
        convert=_negate,
    )
    check_for_nan_in_loss_and_grad: bool = _f(
        True,
        "do not stop at a non-finite loss or gradient (Megatron-LM's flag; by default the "
        "step is not applied, nothing of it is saved and the run stops naming the iteration)",
        flag="--no-check-for-nan-in-loss-and-grad",
        dest="no_check_for_nan_in_loss_and_grad",
        convert=_negate,
    )
    save: str | None = _f(None, "directory of full checkpoints", group="checkpointing")
    save_interval: int | None = _f(None, group="checkpointing")
    save_keep_last: int | None = _f(
        None, "keep only the newest K full checkpoints", group="checkpointing"
    )
    load: str | None = _f(None, "checkpoint directory (or parent) to load", group="checkpointing")
    no_load_optim: bool = _f(False, group="checkpointing")
    no_load_rng: bool = _f(False, group="checkpointing")
    finetune: bool = _f(
        False, "load weights only and start at iteration 0", group="checkpointing"
    )
    async_save: bool = _f(False, "full saves in the background", group="checkpointing")

    def validate(self, data_parallel_size: int) -> None:
        """Loop, batch and checkpoint-flag checks (``data_parallel_size``: DP ranks)."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.micro_batch_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size × DP = {self.micro_batch_size} × {data_parallel_size} = "
                f"{per_step}"
            )
        if self.eval_iters < 0:
            raise ConfigError("--eval-iters must be >= 0 (0: the whole held-out split)")
        if self.train_iters < 1 and not self.eval_only:
            raise ConfigError("--train-iters must be >= 1")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError("--save-interval must be >= 1")
        if self.save_interval and not self.save:
            raise ConfigError("--save-interval needs --save DIR")
        if self.save_keep_last is not None and self.save_keep_last < 1:
            raise ConfigError(
                "--save-keep-last must be >= 1 (the newest checkpoint is always kept)"
            )
        if self.eval_only and not self.load:
            raise ConfigError("--eval-only needs --load CHECKPOINT")


@dataclasses.dataclass
class WSMConfig:
    """Window checkpoints for Warmup-Stable-Merge (docs/merge.md, docs/schedule.md)."""

    GROUP = "WSM window checkpoints"

    wsm_interval: int | None = _f(None, "window save every N iters")
    wsm_interval_tokens: int | None = _f(None, "... or every N tokens")
    wsm_window: int | None = _f(None, "keep the last N iterations")
    wsm_window_tokens: int | None = _f(None, "... or the last N tokens")
    wsm_save: str | None = _f(None, "default: <save>/wsm_window")
    wsm_async: bool = _f(False, "window saves in the background")
    wsm_eval_methods: str | None = _f(
        None,
        "at every --eval-interval also evaluate the merge of the window, built in memory, "
        "for these merge methods (comma list, e.g. 1-sqrt,mean; the merge tool's defaults)",
    )

    @property
    def eval_methods(self) -> list[str]:
        """The ``--wsm-eval-methods`` names, in the order given (empty when off)."""
        return [m.strip() for m in (self.wsm_eval_methods or "").split(",") if m.strip()]

    @property
    def enabled(self) -> bool:
        """Whether window checkpoints are saved at all."""
        return self.wsm_interval is not None or self.wsm_interval_tokens is not None

    def validate(self, full_save_dir: str | None, tokens_per_iter: int) -> None:
        """Own-field checks (``full_save_dir``: ``--save``; ``tokens_per_iter``: global
        batch × sequence length)."""
        if self.wsm_interval is not None and self.wsm_interval_tokens is not None:
            raise ConfigError("give --wsm-interval or --wsm-interval-tokens, not both")
        if self.wsm_window is not None and self.wsm_window_tokens is not None:
            raise ConfigError("give --wsm-window or --wsm-window-tokens, not both")
        if self.enabled and not (self.wsm_save or full_save_dir):
            raise ConfigError(
                "window checkpoints (--wsm-interval) need --wsm-save DIR or --save DIR"
            )
        for flag, value in (
            ("--wsm-interval", self.wsm_interval),
            ("--wsm-interval-tokens", self.wsm_interval_tokens),
            ("--wsm-window", self.wsm_window),
            ("--wsm-window-tokens", self.wsm_window_tokens),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if (self.wsm_window is not None or self.wsm_window_tokens is not None) and not self.enabled:
            raise ConfigError("--wsm-window needs --wsm-interval (or --wsm-interval-tokens)")
        if self.wsm_interval_tokens is not None and self.wsm_interval_tokens % tokens_per_iter:
            raise ConfigError(
                f"--wsm-interval-tokens {self.wsm_interval_tokens} must be a multiple of the "
                f"tokens per iteration ({tokens_per_iter} = global batch × seq length)"
            )
        if self.wsm_eval_methods is not None:
            from megatron_wsm.coefficients import METHODS

            named = [m for m in METHODS if m != "custom"]
            unknown = [m for m in self.eval_methods if m not in named]
            if unknown or not self.eval_methods:
                raise ConfigError(
                    f"--wsm-eval-methods {self.wsm_eval_methods!r}: give a comma list of "
                    f"{', '.join(named)}"
                )
            if not self.enabled:
                raise ConfigError(
                    "--wsm-eval-methods merges the saved window: it needs --wsm-interval "
                    "(or --wsm-interval-tokens)"
                )

    def interval_iters(self, tokens_per_iter: int) -> int | None:
        """The window-save interval in iterations (token flags converted), None when off."""
        if self.wsm_interval is not None:
            return self.wsm_interval
        if self.wsm_interval_tokens is not None:
            return self.wsm_interval_tokens // tokens_per_iter
        return None

    def window_size(self, tokens_per_iter: int) -> int | None:
        """Checkpoints in a full window (``window / interval + 1``: the oldest anchors it), or
        None when every window checkpoint is kept."""
        interval = self.interval_iters(tokens_per_iter)
        if interval is None:
            return None
        if self.wsm_window is not None:
            return self.wsm_window // interval + 1
        if self.wsm_window_tokens is not None:
            return self.wsm_window_tokens // (interval * tokens_per_iter) + 1
        return None


def shape_fields() -> tuple[str, ...]:
    """The :class:`ModelConfig` fields that decide parameter shapes and routing."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("shape"))


#: RunConfig section → its class, in command-line (help) order.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optim": OptimizerSettings,
    "data": DataConfig,
    "training": TrainingConfig,
    "wsm": WSMConfig,
}

#: Fields that older versions wrote and this one ignores when reading a manifest.
_REMOVED_FIELDS = {"training": {"exit_on_missing_checkpoint"}}

#: Flat keys of manifests written before the run info was ``RunConfig.to_json()``.
_LEGACY_KEYS = {
    "seq_length": ("model", "seq_length"),
    "data_path": ("data", "data_path"),
    "tokenizer_model": ("data", "tokenizer_model"),
    "vocab_size": ("data", "vocab_size"),
    "split": ("data", "split"),
    "seed": ("training", "seed"),
}


def _section(name: str, cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known - _REMOVED_FIELDS.get(name, set())
    if unknown:
        # Strict on purpose: a silently dropped field could change the model's shape.
        raise ValueError(
            f"run config section {name!r}: unknown fields {sorted(unknown)} (a checkpoint "
            f"written by a newer megatron-wsm? update this checkout to read it)"
        )
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs, grouped by component."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    wsm: WSMConfig = dataclasses.field(default_factory=WSMConfig)

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens of one global batch (global batch size × sequence length): the unit in which
        the token-based window flags are converted to iterations."""
        return self.training.global_batch_size * self.model.seq_length

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of the whole run config (a checkpoint manifest's run info)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_json`; also reads the run info of older manifests (a ``model``
        section plus flat ``seq_length``/``data_path``/``tokenizer_model``/``vocab_size``/
        ``split``/``seed`` keys). Missing fields take their defaults; unknown ones raise
        ValueError."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in data.items():
            if key in SECTIONS:
                sections[key].update(value or {})
            elif key in _LEGACY_KEYS:
                name, field = _LEGACY_KEYS[key]
                if value is not None:
                    sections[name][field] = value
            else:
                raise ValueError(
                    f"run config: unknown key {key!r} (a checkpoint written by a newer "
                    f"megatron-wsm? update this checkout to read it)"
                )
        return cls(**{n: _section(n, SECTIONS[n], sections[n]) for n in SECTIONS})

    def validate(self, world_size: int, cuda: bool) -> None:
        """Raise :class:`ConfigError` with one clear message for an impossible configuration
        (each section checks itself; the parallel layout's data-parallel size is passed on)."""
        m, par, t = self.model, self.parallel, self.training
        dp = par.validate(world_size, cuda)
        m.validate(par, dp, cuda)
        t.validate(dp)
        self.wsm.validate(t.save, self.tokens_per_iteration)
        if self.wsm.wsm_eval_methods is not None and not t.eval_only:
            interval = self.wsm.interval_iters(self.tokens_per_iteration)
            if not t.eval_interval or (interval and t.eval_interval % interval):
                raise ConfigError(
                    f"--wsm-eval-methods reads out the window at every --eval-interval "
                    f"({t.eval_interval}), which must be a multiple of the window-save interval "
                    f"({interval} iterations) so the newest checkpoint is the current iteration"
                )
        self.data.validate()
        self.optim.validate(max(t.train_iters, 1))
