"""Loop length, batches, logging, evaluation and checkpoint flags: :class:`TrainingConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_wsm.config.fields import ConfigError, flag_field, negate

_RECOMPUTE = "activation recomputation (Megatron-LM's flags; same results, less memory)"

_KERNELS = (
    "GPU kernels (Megatron-LM's switches: a fusion is on where its kernel imports, on CPU none "
    "is; these turn one off)"
)

#: The fusion switches above: megatron-core ``TransformerConfig`` fields of the same names.
FUSION_FIELDS = (
    "masked_softmax_fusion", "apply_rope_fusion", "bias_dropout_fusion",
    "gradient_accumulation_fusion",
)  # fmt: skip


def _fusion_switch(flag: str, help: str) -> Any:  # noqa: A002
    """A fusion field (on by default) with Megatron-LM's ``--no-…`` switch that turns it off."""
    return flag_field(
        True, help, flag=flag, dest=flag[2:].replace("-", "_"), convert=negate, group=_KERNELS
    )


#: megatron-core 0.16's ``recompute_modules`` choices (TransformerConfig.__post_init__).
RECOMPUTE_MODULES = (
    "core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"
)  # fmt: skip


@dataclasses.dataclass
class TrainingConfig:
    """Loop length, batch sizes, logging, evaluation and checkpointing."""

    GROUP = "training"

    micro_batch_size: int = flag_field(4)
    global_batch_size: int = flag_field(8)
    train_iters: int = flag_field(100)
    exit_interval: int | None = flag_field(
        None, "stop when the iteration is a multiple of N (a full checkpoint is saved first)"
    )
    seed: int = flag_field(1234)
    log_interval: int = flag_field(10)
    eval_interval: int = flag_field(50, "0: no periodic evaluation")
    eval_iters: int = flag_field(10, "global batches per evaluation; 0: whole split")
    eval_only: bool = flag_field(False, "evaluate --load and exit")
    output_json: str | None = flag_field(None, "write final evaluation here")
    tensorboard_dir: str | None = flag_field(None)
    progress_bar: bool = flag_field(
        True, None, flag="--no-progress-bar", dest="no_progress_bar", convert=negate
    )
    moe_metrics: bool = flag_field(
        True,
        "do not compute load-balance violations",
        flag="--no-moe-metrics",
        dest="no_moe_metrics",
        convert=negate,
    )
    check_for_nan_in_loss_and_grad: bool = flag_field(
        True,
        "do not stop at a non-finite loss or gradient (Megatron-LM's flag; by default the "
        "step is not applied, nothing of it is saved and the run stops naming the iteration)",
        flag="--no-check-for-nan-in-loss-and-grad",
        dest="no_check_for_nan_in_loss_and_grad",
        convert=negate,
    )
    wandb_project: str | None = flag_field(
        None,
        "also log the TensorBoard scalars to this Weights & Biases project (needs the wandb "
        "extra; the rank that writes TensorBoard logs)",
        group="logging",
    )
    wandb_exp_name: str | None = flag_field(None, "the W&B run name", group="logging")
    wandb_save_dir: str | None = flag_field(
        None, "local W&B directory (default: <save>/wandb)", group="logging"
    )
    wandb_entity: str | None = flag_field(None, "the W&B entity (team)", group="logging")
    recompute_activations: bool = flag_field(
        False,
        "recompute the selected submodules in the backward pass (= --recompute-granularity "
        "selective; default module: core_attn)",
        group=_RECOMPUTE,
    )
    recompute_granularity: str | None = flag_field(
        None,
        "full: whole layers (needs --recompute-method and --recompute-num-layers); selective: "
        "the --recompute-modules",
        choices=["full", "selective"],
        group=_RECOMPUTE,
    )
    recompute_method: str | None = flag_field(
        None, "which layers full recomputation covers", choices=["uniform", "block"],
        group=_RECOMPUTE,
    )  # fmt: skip
    recompute_num_layers: int | None = flag_field(
        None, "layers per recomputed chunk (uniform) or per pipeline stage (block)",
        group=_RECOMPUTE,
    )  # fmt: skip
    recompute_modules: list[str] | None = flag_field(
        None,
        f"submodules of selective recomputation: {' '.join(RECOMPUTE_MODULES)} (default core_attn)",
        nargs="+",
        group=_RECOMPUTE,
    )
    moe_layer_recompute: bool = flag_field(
        False, "recompute whole MoE layers (megatron-core adds 'moe' to the modules)",
        group=_RECOMPUTE,
    )  # fmt: skip
    masked_softmax_fusion: bool = _fusion_switch(
        "--no-masked-softmax-fusion", "do not use the fused masked-softmax kernel"
    )
    apply_rope_fusion: bool = _fusion_switch(
        "--no-rope-fusion", "do not use Transformer Engine's fused RoPE"
    )
    bias_dropout_fusion: bool = _fusion_switch(
        "--no-bias-dropout-fusion", "do not fuse bias + dropout + add (torch.compile)"
    )
    gradient_accumulation_fusion: bool = _fusion_switch(
        "--no-gradient-accumulation-fusion",
        "do not fuse the weight-gradient accumulation (apex's kernel)",
    )
    save: str | None = flag_field(None, "directory of full checkpoints", group="checkpointing")
    save_interval: int | None = flag_field(None, group="checkpointing")
    save_keep_last: int | None = flag_field(
        None, "keep only the newest K full checkpoints", group="checkpointing"
    )
    load: str | None = flag_field(
        None, "checkpoint directory (or parent) to load", group="checkpointing"
    )
    exit_on_missing_checkpoint: bool = flag_field(
        False,
        "stop (exit 2) when --load holds no checkpoint instead of starting from random "
        "initialization (Megatron-LM's flag)",
        group="checkpointing",
    )
    no_load_optim: bool = flag_field(False, group="checkpointing")
    no_load_rng: bool = flag_field(False, group="checkpointing")
    finetune: bool = flag_field(
        False, "load weights only and start at iteration 0", group="checkpointing"
    )
    async_save: bool = flag_field(False, "full saves in the background", group="checkpointing")

    def recompute_kwargs(self) -> dict[str, Any]:
        """megatron-core ``TransformerConfig`` recompute fields, as Megatron-LM derives them
        (``--recompute-activations`` means selective granularity)."""
        granularity = "selective" if self.recompute_activations else self.recompute_granularity
        kwargs: dict[str, Any] = {
            "recompute_granularity": granularity,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_num_layers,
            "moe_layer_recompute": self.moe_layer_recompute,
        }
        if self.recompute_modules is not None:
            kwargs["recompute_modules"] = list(self.recompute_modules)
        return kwargs

    def transformer_overrides(self) -> dict[str, Any]:
        """What this run sets in megatron-core's ``TransformerConfig`` beyond the model: the
        recompute fields and the fusions switched off (speed and memory, not results)."""
        off = {name: False for name in FUSION_FIELDS if not getattr(self, name)}
        return {**self.recompute_kwargs(), **off}

    def validate_recompute(self) -> None:
        """megatron-core's recompute rules, checked before anything starts."""
        granularity = self.recompute_kwargs()["recompute_granularity"]
        if granularity == "full" and (
            self.recompute_method is None or self.recompute_num_layers is None
        ):
            raise ConfigError(
                "--recompute-granularity full needs --recompute-method uniform|block and "
                "--recompute-num-layers N (megatron-core)"
            )
        if granularity == "selective" and self.recompute_num_layers is not None:
            raise ConfigError("--recompute-num-layers applies to --recompute-granularity full only")
        if granularity is None and (self.recompute_method or self.recompute_num_layers):
            raise ConfigError(
                "--recompute-method/--recompute-num-layers need --recompute-granularity full"
            )
        unknown = sorted(set(self.recompute_modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(
                f"--recompute-modules {' '.join(unknown)}: unknown; megatron-core has "
                f"{' '.join(RECOMPUTE_MODULES)}"
            )

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
        if self.wandb_project is not None:
            if self.wandb_exp_name == "":
                raise ConfigError("--wandb-exp-name must not be empty (Megatron-LM's rule)")
            from megatron_wsm.wandb_writer import wandb_missing_message

            missing = wandb_missing_message()
            if missing:
                raise ConfigError(missing)
        self.validate_recompute()
        if self.eval_only and not self.load:
            raise ConfigError("--eval-only needs --load CHECKPOINT")
