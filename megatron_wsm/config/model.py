"""Model shape and architecture: :class:`ModelConfig` (Megatron-LM's model flags)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from megatron_wsm.accelerators import (
    GROUPED_GEMM_LOCAL_SPEC,
    GROUPED_GEMM_NO_EFFECT,
    transformer_engine_usable,
)
from megatron_wsm.config.fields import ConfigError, bf16_dtype, flag_field
from megatron_wsm.config.layer_freq import LayerFreqError, moe_layer_pattern, parse_moe_layer_freq

if TYPE_CHECKING:
    from megatron_wsm.config.parallel import ParallelConfig


#: Megatron-LM's ``--moe-router-load-balancing-type`` choices.
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
#: ``--transformer-impl`` choices: Transformer Engine's layer spec where TE is usable (else the
#: local one), or megatron-core's local spec everywhere.
TRANSFORMER_IMPLS = ("transformer_engine", "local")

#: ``shape`` metadata of the model fields added after checkpoint manifests began to hash the
#: model's shape fields: such a field enters the identity only when it differs from its default,
#: so that checkpoints written before it existed (where it was, in effect, at its default) keep
#: their identity and stay loadable (see :func:`model_identity_fields`).
SHAPE_IF_SET = "if-set"


@dataclasses.dataclass
class ModelConfig:
    """Shape of the MoE GPT model."""

    GROUP = "model"

    num_layers: int = flag_field(2, "transformer layers", shape=True)
    hidden_size: int = flag_field(64, "model width", shape=True)
    ffn_hidden_size: int | None = flag_field(None, "dense FFN width (4×hidden)", shape=True)
    num_attention_heads: int = flag_field(4, "attention heads", shape=True)
    num_query_groups: int | None = flag_field(
        None,
        "GQA groups (key/value heads). Megatron-LM reads it only with --group-query-attention; "
        "here it is honoured alone too (as before)",
        shape=True,
    )
    group_query_attention: bool = flag_field(
        False,
        "group-query attention with --num-query-groups groups (Megatron-LM: 1 group, i.e. "
        "multi-query attention, when --num-query-groups is not given)",
    )
    kv_channels: int | None = flag_field(
        None, "projection width of one attention head (default: hidden / heads)", shape=SHAPE_IF_SET
    )
    seq_length: int = flag_field(128, "tokens per sample")
    #: None → ``seq_length`` (filled in by ``__post_init__``, as the flag always did)
    max_position_embeddings: int | None = flag_field(None, "default: --seq-length", shape=True)
    # -- architecture (Megatron-LM's flags; where our default differs, docs/model_families.md)
    swiglu: bool = flag_field(
        True,
        "SwiGLU MLPs (gated linear unit + SiLU); this project's default (Megatron-LM's is GELU "
        "without --swiglu): accepted, and --no-swiglu selects GELU",
        shape=SHAPE_IF_SET,
    )
    no_swiglu: bool = flag_field(
        False,
        "GELU MLPs without gating (Megatron-LM's default activation; ours is SwiGLU). Folded "
        "into swiglu when the config is built",
    )
    normalization: str = flag_field(
        "RMSNorm",
        "norm type (Megatron-LM's default: LayerNorm)",
        choices=["LayerNorm", "RMSNorm"],
        shape=True,
    )
    layernorm_epsilon: float = flag_field(
        1e-5, "epsilon of every LayerNorm/RMSNorm", flag="--norm-epsilon"
    )
    position_embedding_type: str = flag_field(
        "rope",
        "position embedding (Megatron-LM's default: learned_absolute)",
        choices=["rope", "learned_absolute", "none"],
        shape=True,
    )
    no_position_embedding: bool = flag_field(
        False,
        "(Megatron-LM, deprecated there) no learned absolute position embedding: accepted with "
        "--position-embedding-type rope (where it changes nothing), refused otherwise as "
        "Megatron-LM does",
    )
    use_rotary_position_embeddings: bool = flag_field(
        False, "(Megatron-LM, deprecated there) same as --position-embedding-type rope"
    )
    rotary_base: int = flag_field(10000, "RoPE base (theta)", shape=SHAPE_IF_SET)
    rotary_percent: float = flag_field(
        1.0, "fraction of each head's dimensions that RoPE rotates", shape=SHAPE_IF_SET
    )
    rotary_scaling_factor: float = flag_field(
        1.0, "RoPE scaling factor (YaRN with --multi-latent-attention)"
    )
    mscale: float = flag_field(1.0, "YaRN mscale of multi-latent attention")
    mscale_all_dim: float = flag_field(0.0, "YaRN mscale_all_dim of multi-latent attention")
    qk_layernorm: bool = flag_field(
        False, "normalise queries and keys per head", shape=SHAPE_IF_SET
    )
    add_bias_linear: bool = flag_field(
        False,
        "biases in every linear layer (Megatron-LM's default; off here, as in modern MoE LLMs)",
        shape=SHAPE_IF_SET,
    )
    disable_bias_linear: bool = flag_field(
        False, "(Megatron-LM) no linear biases: this project's default, accepted"
    )
    add_qkv_bias: bool = flag_field(
        False,
        "biases in the QKV projection only (implied by --add-bias-linear)",
        shape=SHAPE_IF_SET,
    )
    init_method_std: float = flag_field(0.02, "standard deviation of the initial weights")
    hidden_dropout: float = flag_field(0.0, "dropout after attention and MLP (Megatron-LM: 0.1)")
    attention_dropout: float = flag_field(
        0.0, "dropout of attention probabilities (Megatron-LM: 0.1)"
    )
    attention_softmax_in_fp32: bool = flag_field(
        True,
        "attention softmax in fp32 under bf16/fp16: always on here (megatron-core's default; "
        "Megatron-LM computes it in the low precision unless given): accepted",
    )
    # -- multi-latent attention (DeepSeek-V2/V3)
    multi_latent_attention: bool = flag_field(
        False,
        "multi-latent attention (DeepSeek-V2/V3): low-rank query and key/value",
        shape=SHAPE_IF_SET,
    )
    q_lora_rank: int | None = flag_field(
        None, "query low rank (None: a full query projection)", shape=SHAPE_IF_SET
    )
    kv_lora_rank: int = flag_field(32, "key/value low rank", shape=SHAPE_IF_SET)
    qk_head_dim: int = flag_field(
        128, "query/key head width without the RoPE part", shape=SHAPE_IF_SET
    )
    qk_pos_emb_head_dim: int = flag_field(
        64, "query/key head width of the RoPE part", shape=SHAPE_IF_SET
    )
    v_head_dim: int = flag_field(128, "value head width", shape=SHAPE_IF_SET)
    # -- mixture of experts
    num_experts: int | None = flag_field(4, "experts per MoE layer (0: dense)", shape=True)
    moe_ffn_hidden_size: int | None = flag_field(None, "expert FFN width", shape=True)
    moe_layer_freq: str | int | list[int] = flag_field(
        1,
        "MoE layers: N (every N-th layer from layer 0) or a 0/1 list expression as in "
        "Megatron-LM, e.g. '([0]+[1]*3)' (parsed, never evaluated)",
        shape=SHAPE_IF_SET,
    )
    moe_shared_expert_intermediate_size: int | None = flag_field(
        None,
        "width of the shared experts of each MoE layer (None: no shared expert)",
        shape=SHAPE_IF_SET,
    )
    moe_shared_expert_overlap: bool = flag_field(
        False, "overlap the shared expert with the dispatch (megatron-core; alltoall dispatcher)"
    )
    moe_shared_expert_gate: bool = flag_field(
        False,
        "scale the shared experts' output by a sigmoid gate of the token (Qwen1.5/Qwen2-MoE); "
        "only with --moe-shared-expert-intermediate-size, as in Megatron-LM",
        shape=SHAPE_IF_SET,
    )
    moe_router_topk: int = flag_field(2, "experts per token", shape=True)
    moe_router_score_function: str = flag_field(
        "softmax", "router score function", choices=["softmax", "sigmoid"], shape=SHAPE_IF_SET
    )
    moe_router_pre_softmax: bool = flag_field(
        False, "softmax before the top-k selection (softmax router)", shape=SHAPE_IF_SET
    )
    moe_router_topk_scaling_factor: float | None = flag_field(
        None, "scale of the top-k routing weights"
    )
    moe_router_num_groups: int | None = flag_field(
        None, "expert groups of group-limited routing", shape=SHAPE_IF_SET
    )
    moe_router_group_topk: int | None = flag_field(
        None, "groups each token may route to (group-limited routing)", shape=SHAPE_IF_SET
    )
    moe_router_enable_expert_bias: bool = flag_field(
        False,
        "aux-loss-free load balancing: a per-expert bias added to the scores for the top-k "
        "choice, updated from the expert loads (sigmoid router)",
        shape=SHAPE_IF_SET,
    )
    moe_router_bias_update_rate: float = flag_field(1e-3, "update rate of the expert bias")
    moe_router_dtype: str = flag_field(
        "fp32",
        "router computation dtype (Megatron-LM's default: the model dtype)",
        choices=["fp32", "fp64"],
    )
    moe_token_dispatcher_type: str = flag_field("alltoall", choices=["alltoall", "allgather"])
    moe_aux_loss_coeff: float | list[float] = flag_field(
        1e-2,
        "scale of the load-balancing loss; one value per --moe-router-load-balancing-type when "
        "several are given (this project's default 1e-2, Megatron-LM's 0)",
        nargs="+",
    )
    moe_router_load_balancing_type: str | list[str] = flag_field(
        "aux_loss",
        "load-balancing strategy: aux_loss (GShard/Switch), seq_aux_loss (per sequence, "
        "DeepSeek-V2), global_aux_loss, sinkhorn, none; several aux-loss types may be combined, "
        "each with its own --moe-aux-loss-coeff",
        choices=list(LOAD_BALANCING_TYPES),
        nargs="+",
    )
    moe_z_loss_coeff: float | None = flag_field(None, "router z-loss coefficient")
    moe_expert_capacity_factor: float | None = flag_field(
        None,
        "expert capacity factor: tokens over capacity are dropped (None: no dropping)",
        shape=SHAPE_IF_SET,
    )
    moe_token_drop_policy: str = flag_field(
        "probs", "which tokens are dropped over capacity", choices=["probs", "position"]
    )
    moe_pad_expert_input_to_capacity: bool = flag_field(
        False, "pad each expert's input to its capacity"
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
        "run each layer's experts as one grouped GEMM (Transformer Engine on CUDA); "
        "checkpoints are the same as without; elsewhere accepted without effect (noted once)",
    )
    transformer_impl: str = flag_field(
        "transformer_engine",
        "layer implementation (Megatron-LM's): transformer_engine = Transformer Engine's layer "
        "spec where TE is usable (CUDA and TE installed), megatron-core's local spec otherwise "
        "(always on CPU); local = megatron-core's local spec everywhere (same weight keys)",
        choices=list(TRANSFORMER_IMPLS),
    )
    layout_independent_init: bool = flag_field(
        False, "initialise weights identically for every TP/PP/EP layout (tests, small models)"
    )
    #: Set from the tokenizer by the trainer; ``DataConfig.vocab_size`` is the flag.
    vocab_size: int | None = flag_field(None, flag=None, shape=True)
    untie_embeddings_and_output_weights: bool = flag_field(
        True,
        "separate input embedding and output layer: this project's default (Megatron-LM ties "
        "them unless given): accepted; --tie-embeddings-and-output-weights ties them",
        shape=True,
    )
    tie_embeddings_and_output_weights: bool = flag_field(
        False,
        "share the input embedding with the output layer (Megatron-LM ties by default and "
        "unties with --untie-embeddings-and-output-weights; this project unties by default)",
    )

    def __post_init__(self) -> None:
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_experts == 0:  # the flag's "0: dense"
            self.num_experts = None
        self._fold_switches()
        self._fold_load_balancing_lists()
        try:
            self.moe_layer_freq = parse_moe_layer_freq(self.moe_layer_freq)
        except LayerFreqError as e:
            raise ConfigError(str(e)) from None

    def _fold_switches(self) -> None:
        """Fold the switch flags that only set another field into it, and clear them.

        Megatron-LM spells some settings two ways (``--use-rotary-position-embeddings`` and
        ``--position-embedding-type rope``), and this project adds the inverse of switches
        whose default differs from Megatron-LM's (``--no-swiglu``, ``--tie-…``); after
        folding, the canonical field alone holds the setting, so manifests and a resumed run's
        flag defaults read one value.
        """
        if self.group_query_attention and self.num_query_groups is None:
            self.num_query_groups = 1  # Megatron-LM's default number of groups
        if self.no_swiglu:
            self.swiglu = False
        if self.tie_embeddings_and_output_weights:
            self.untie_embeddings_and_output_weights = False
        if self.disable_bias_linear:
            if self.add_bias_linear:
                raise ConfigError("--add-bias-linear and --disable-bias-linear contradict")
        if self.use_rotary_position_embeddings:
            self.position_embedding_type = "rope"
        if self.no_position_embedding and self.position_embedding_type != "rope":
            # Megatron-LM raises the same (its --no-position-embedding only means "with rope").
            raise ConfigError(
                "--no-position-embedding is deprecated in Megatron-LM and only accepted with "
                "--position-embedding-type rope; use --position-embedding-type none"
            )
        if self.add_bias_linear:  # Megatron-LM keeps the two in sync
            self.add_qkv_bias = True
        self.no_swiglu = self.tie_embeddings_and_output_weights = False
        self.disable_bias_linear = self.use_rotary_position_embeddings = False
        self.no_position_embedding = False

    def _fold_load_balancing_lists(self) -> None:
        """One ``--moe-router-load-balancing-type`` / ``--moe-aux-loss-coeff`` value is kept as a
        plain str / float, as Megatron-LM's ``validate_args`` unwraps a one-element list: the
        manifests and checkpoint ``args`` of single-type runs stay as they were, and only a
        real list (several types, megatron-core's per-type coefficients) reaches
        megatron-core as a list."""
        self.moe_router_load_balancing_type = _unwrap_one(self.moe_router_load_balancing_type)
        self.moe_aux_loss_coeff = _unwrap_one(self.moe_aux_loss_coeff)

    @property
    def query_groups(self) -> int | None:
        """Key/value head groups megatron-core gets (None: one per head): ``--num-query-groups``
        (``--group-query-attention`` alone has set it to Megatron-LM's default of one group, so
        the shape lives in one field)."""
        return self.num_query_groups

    def moe_layers(self) -> list[int]:
        """Global indices (from 0) of the MoE layers; empty for a dense model."""
        if not self.num_experts:
            return []
        pattern = moe_layer_pattern(self.moe_layer_freq, self.num_layers)  # type: ignore[arg-type]
        return [i for i, moe in enumerate(pattern) if moe]

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
        self.validate_attention(tp)
        if cp > 1 and self.transformer_impl == "local":
            raise ConfigError(
                "--context-parallel-size > 1 needs Transformer Engine's attention; "
                "--transformer-impl local builds megatron-core's local attention, which does "
                "not support context parallelism"
            )
        if self.num_experts:
            self.validate_moe()
            if self.add_bias_linear and tp > 1:
                # megatron-core asserts "Bias in Moe is only supported when ETP==1", and its
                # expert tensor-parallel size follows TP here (dense TP + biases run on CPU).
                raise ConfigError(
                    "--add-bias-linear in an MoE model needs --tensor-model-parallel-size 1: "
                    "megatron-core supports expert biases only with expert tensor parallel "
                    "size 1, which follows TP here"
                )
        self.validate_accelerator(cuda)

    def validate_attention(self, tp: int) -> None:
        """Attention-shape checks megatron-core would otherwise make after start-up."""
        groups = self.query_groups
        if groups is not None:
            if self.num_attention_heads % groups:
                raise ConfigError(
                    f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                    f"--num-query-groups {groups}"
                )
            if groups % tp:
                raise ConfigError(f"--num-query-groups {groups} is not divisible by TP {tp}")
        if self.multi_latent_attention:
            if self.group_query_attention or self.num_query_groups is not None:
                # Megatron-LM asserts the same: MLA has its own key/value compression.
                raise ConfigError(
                    "--multi-latent-attention and group-query attention are mutually exclusive"
                )
            if self.position_embedding_type != "rope":
                raise ConfigError(
                    "--multi-latent-attention applies its own rotary embedding: it needs "
                    "--position-embedding-type rope"
                )

    def validate_moe(self) -> None:
        """Router and layer-pattern checks (megatron-core's own, made before start-up)."""
        assert self.num_experts
        try:
            moe_layer_pattern(self.moe_layer_freq, self.num_layers)  # type: ignore[arg-type]
        except LayerFreqError as e:
            raise ConfigError(str(e)) from None
        if not self.moe_layers():
            raise ConfigError("--moe-layer-freq makes no layer an MoE layer")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ConfigError(
                "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                "(megatron-core supports the expert bias only there)"
            )
        if self.moe_router_group_topk:
            groups = self.moe_router_num_groups
            if not groups:
                raise ConfigError("--moe-router-group-topk needs --moe-router-num-groups")
            if self.num_experts % groups:
                raise ConfigError(
                    f"--num-experts {self.num_experts} is not divisible by "
                    f"--moe-router-num-groups {groups}"
                )
            if self.moe_router_group_topk > groups:
                raise ConfigError("--moe-router-group-topk exceeds --moe-router-num-groups")
        self.validate_load_balancing()
        if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor >= 0:
            if self.moe_router_load_balancing_type == "sinkhorn":
                raise ConfigError(
                    "--moe-expert-capacity-factor works with aux_loss, seq_aux_loss, "
                    "global_aux_loss or none load balancing, not sinkhorn"
                )
        elif self.moe_pad_expert_input_to_capacity:
            raise ConfigError(
                "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"
            )

    def validate_load_balancing(self) -> None:
        """``--moe-router-load-balancing-type`` against ``--moe-aux-loss-coeff``, checked here
        so that megatron-core's assertion (a list of types needs a list of coefficients of the
        same length) and its silent cases never arise after start-up: sinkhorn runs only as
        the sole type (in a list megatron-core ignores it), and a repeated type would get only
        its first coefficient."""
        types, coeffs = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        if isinstance(types, list) or isinstance(coeffs, list):
            n_types = len(types) if isinstance(types, list) else 1
            n_coeffs = len(coeffs) if isinstance(coeffs, list) else 1
            if n_types != n_coeffs:
                raise ConfigError(
                    f"--moe-aux-loss-coeff needs one value per --moe-router-load-balancing-type: "
                    f"{n_types} type(s) ({_words(types)}) but {n_coeffs} coefficient(s) "
                    f"({_words(coeffs)})"
                )
        if isinstance(types, list):
            if "sinkhorn" in types:
                raise ConfigError(
                    "--moe-router-load-balancing-type sinkhorn cannot be combined with other "
                    "types (megatron-core runs sinkhorn only as the sole type)"
                )
            repeated = sorted({t for t in types if types.count(t) > 1})
            if repeated:
                raise ConfigError(
                    f"--moe-router-load-balancing-type repeats {', '.join(repeated)}: give each "
                    "type once, with its coefficient"
                )
        elif types == "sinkhorn" and coeffs:
            raise ConfigError(
                "--moe-router-load-balancing-type sinkhorn has no auxiliary loss: pass "
                "--moe-aux-loss-coeff 0 (this project's default is 1e-2, Megatron-LM's 0)"
            )

    def validate_accelerator(self, cuda: bool, te: bool | None = None) -> None:
        """GPU-only options that are wrong on any machine (``cuda``, ``te``: kept for callers
        that probe; ``--moe-grouped-gemm`` without TE is a note, :meth:`accelerator_notes`)."""
        if self.moe_grouped_gemm and not self.num_experts:
            raise ConfigError("--moe-grouped-gemm needs --num-experts")

    def accelerator_notes(self, te: bool | None = None) -> list[str]:
        """Kernel flags accepted without effect on this machine, one note each (``te``:
        Transformer Engine usable; probed only when a flag needs it and it is None)."""
        if not (self.moe_grouped_gemm and self.num_experts):
            return []
        if self.transformer_impl == "local":
            return [GROUPED_GEMM_LOCAL_SPEC]
        if te is None:
            te = transformer_engine_usable()
        return [] if te else [GROUPED_GEMM_NO_EFFECT]


def _unwrap_one(value: Any) -> Any:
    """A one-element list (or tuple) as its element; other lists as lists (a JSON round trip
    or argparse may hand a tuple); anything else unchanged."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else list(value)
    return value


def load_balancing_coeffs(types: str | list[str], coeffs: float | list[float]) -> dict[str, float]:
    """Each ``--moe-router-load-balancing-type`` with its ``--moe-aux-loss-coeff``, paired as
    megatron-core's router pairs them (``get_aux_loss_coeff``: one type takes the one value,
    a list the value at its position); a pure function for readers of a manifest's model
    config (e.g. the HF export's single ``router_aux_loss_coef``: ``.get("aux_loss")``, else
    the one type's value). Assumes a validated pair (equal lengths)."""
    if isinstance(types, list):
        values = coeffs if isinstance(coeffs, list) else [coeffs]
        return {t: float(c) for t, c in zip(types, values, strict=True)}
    return {types: float(coeffs[0] if isinstance(coeffs, list) else coeffs)}


def _words(value: Any) -> str:
    """A flag's value(s) as the command line spells them."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def model_identity_fields(model_json: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``model_json`` (``ModelConfig.to_json()``) that identify the model's shape
    and routing in manifests: every ``shape=True`` field, and each ``shape=SHAPE_IF_SET`` field
    whose value differs from its default."""
    ident: dict[str, Any] = {}
    for field in dataclasses.fields(ModelConfig):
        shape = field.metadata.get("shape")
        if not shape:
            continue
        value = model_json.get(field.name, field.default)
        if shape == SHAPE_IF_SET and value == field.default:
            continue
        ident[field.name] = model_json.get(field.name)
    return ident
