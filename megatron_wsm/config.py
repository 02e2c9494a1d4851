"""Typed configuration of a training run, passed explicitly to every component.

``arguments.py`` turns the command line into these dataclasses once; no component reads a
global ``args``. Field names follow the Megatron-LM flag they come from
(``--tensor-model-parallel-size`` → ``tensor_model_parallel_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ModelConfig:
    """Shape of the MoE GPT model."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int | None = None  #: dense FFN width; default 4 × hidden
    num_attention_heads: int = 4
    num_query_groups: int | None = None  #: GQA groups; None = multi-head attention
    seq_length: int = 128
    max_position_embeddings: int = 128
    vocab_size: int | None = None  #: taken from the tokenizer when None
    num_experts: int | None = 4  #: None or 0 → dense model
    moe_ffn_hidden_size: int | None = None  #: expert FFN width; default = ffn_hidden_size
    moe_router_topk: int = 2
    moe_token_dispatcher_type: str = "alltoall"  #: alltoall | allgather
    moe_aux_loss_coeff: float = 1e-2
    moe_router_load_balancing_type: str = "aux_loss"  #: aux_loss | seq_aux_loss | none
    moe_grouped_gemm: bool = False
    position_embedding_type: str = "rope"
    normalization: str = "RMSNorm"
    untie_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    params_dtype: str = "fp32"  #: fp32 | bf16 (bf16 implies megatron mixed precision)
    layout_independent_init: bool = False  #: same initial weights for every TP/PP/EP layout

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict; its hash identifies the model in checkpoint manifests."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ParallelConfig:
    """How the model and data are split over ranks (Megatron semantics)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  #: DP gradient reduce overlapped with backward
    overlap_param_gather: bool = False  #: distributed optimizer's param all-gather overlapped
    #: how full checkpoints store the distributed optimizer's state (megatron-core's names):
    #: dp_reshardable | fully_reshardable
    ckpt_optim_sharding: str = "dp_reshardable"
    distributed_backend: str | None = None  #: None → nccl with CUDA, gloo without


@dataclasses.dataclass
class OptimizerSettings:
    """Adam hyper-parameters and the LR schedule."""

    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "stable"  #: stable|constant|WSD|cosine|linear|inverse-square-root
    lr_decay_iters: int | None = None  #: default: train_iters
    lr_wsd_decay_style: str = "1-sqrt"  #: linear|cosine|exponential|1-sqrt (minus_sqrt)
    lr_wsd_decay_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclasses.dataclass
class DataConfig:
    """Where training tokens come from."""

    data_path: str | None = None  #: indexed-dataset prefix; None → embedded corpus
    split: str = "969,30,1"
    tokenizer_model: str | None = None  #: sentencepiece model; None → trained on the corpus
    data_cache_dir: str = "data_cache"  #: embedded corpus, tokenizer and dataset index cache
    vocab_size: int = 4096  #: vocabulary of the tokenizer trained on the embedded corpus


@dataclasses.dataclass
class TrainingConfig:
    """Loop length, batch sizes, logging, evaluation and checkpointing."""

    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    exit_interval: int | None = None  #: stop (after saving) once iteration % N == 0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    save: str | None = None
    save_interval: int | None = None
    save_keep_last: int | None = None  #: keep the newest K full checkpoints (None = all)
    load: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  #: load weights only, start at iteration 0
    eval_only: bool = False
    output_json: str | None = None
    exit_on_missing_checkpoint: bool = True
    progress_bar: bool = True
    moe_metrics: bool = True  #: log load-balance violation metrics
    async_save: bool = False


@dataclasses.dataclass
class WSMConfig:
    """Window checkpoints for Warmup-Stable-Merge (docs/merge.md, docs/schedule.md)."""

    wsm_interval: int | None = None  #: save a window checkpoint every N iterations
    wsm_interval_tokens: int | None = None
    wsm_window: int | None = None  #: keep window checkpoints of the last N iterations
    wsm_window_tokens: int | None = None
    wsm_save: str | None = None  #: default <save>/wsm_window
    wsm_async: bool = False


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs, grouped by component."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    wsm: WSMConfig = dataclasses.field(default_factory=WSMConfig)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of the whole run config."""
        return dataclasses.asdict(self)
