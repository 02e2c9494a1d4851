"""Model shape and architecture: :class:`ModelConfig` (Megatron-LM's model flags)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from megatron_wsm.accelerators import GROUPED_GEMM_NEEDS_TE, transformer_engine_usable
from megatron_wsm.config.fields import ConfigError, bf16_dtype, flag_field, negate

if TYPE_CHECKING:
    from megatron_wsm.config.parallel import ParallelConfig


@dataclasses.dataclass
class ModelConfig:
    """Shape of the MoE GPT model."""

    GROUP = "model"

    num_layers: int = flag_field(2, "transformer layers", shape=True)
    hidden_size: int = flag_field(64, "model width", shape=True)
    ffn_hidden_size: int | None = flag_field(None, "dense FFN width (4×hidden)", shape=True)
    num_attention_heads: int = flag_field(4, "attention heads", shape=True)
    num_query_groups: int | None = flag_field(None, "GQA groups", shape=True)
    seq_length: int = flag_field(128, "tokens per sample")
    #: None → ``seq_length`` (filled in by ``__post_init__``, as the flag always did)
    max_position_embeddings: int | None = flag_field(None, "default: --seq-length", shape=True)
    num_experts: int | None = flag_field(4, "experts per MoE layer (0: dense)", shape=True)
    moe_ffn_hidden_size: int | None = flag_field(None, "expert FFN width", shape=True)
    moe_router_topk: int = flag_field(2, "experts per token", shape=True)
    moe_token_dispatcher_type: str = flag_field("alltoall", choices=["alltoall", "allgather"])
    moe_aux_loss_coeff: float = flag_field(1e-2, "load-balancing loss")
    moe_router_load_balancing_type: str = flag_field(
        "aux_loss", choices=["aux_loss", "seq_aux_loss", "none"]
    )
    params_dtype: str = flag_field(
        "fp32",
        "bf16 params with fp32 master weights",
        flag="--bf16",
        dest="bf16",
        convert=bf16_dtype,
    )
    moe_grouped_gemm: bool = flag_field(
        False,
        "run each layer's experts as one grouped GEMM (Transformer Engine, GPU only); "
        "checkpoints are the same as without",
    )
    layout_independent_init: bool = flag_field(
        False, "initialise weights identically for every TP/PP/EP layout (tests, small models)"
    )
    #: Set from the tokenizer by the trainer; ``DataConfig.vocab_size`` is the flag.
    vocab_size: int | None = flag_field(None, flag=None, shape=True)
    position_embedding_type: str = flag_field("rope", flag=None, shape=True)
    normalization: str = flag_field("RMSNorm", flag=None, shape=True)
    untie_embeddings_and_output_weights: bool = flag_field(
        True,
        "share the input embedding with the output layer (Megatron-LM ties by default and "
        "unties with --untie-embeddings-and-output-weights; this project unties by default)",
        flag="--tie-embeddings-and-output-weights",
        dest="tie_embeddings_and_output_weights",
        convert=negate,
        shape=True,
    )
    hidden_dropout: float = flag_field(0.0, flag=None)
    attention_dropout: float = flag_field(0.0, flag=None)
    init_method_std: float = flag_field(0.02, flag=None)

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
