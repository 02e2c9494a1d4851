"""How the model and data are split over ranks: :class:`ParallelConfig`."""

from __future__ import annotations

import dataclasses

from megatron_wsm.config.fields import ConfigError, flag_field


@dataclasses.dataclass
class ParallelConfig:
    """How the model and data are split over ranks (Megatron semantics)."""

    GROUP = "parallelism"

    tensor_model_parallel_size: int = flag_field(1)
    pipeline_model_parallel_size: int = flag_field(1)
    expert_model_parallel_size: int = flag_field(1)
    context_parallel_size: int = flag_field(1)
    sequence_parallel: bool = flag_field(False, "required for MoE with TP > 1")
    use_distributed_optimizer: bool = flag_field(
        False,
        "shard the optimizer state (fp32 main weights, Adam moments) over data-parallel ranks",
    )
    #: how full checkpoints store the distributed optimizer's state (megatron-core's names):
    #: dp_reshardable | fully_reshardable
    ckpt_optim_sharding: str = flag_field(
        "dp_reshardable",
        "save the distributed optimizer's state in a layout-independent form (gathered per "
        "parameter; slower saves) instead of its DP-sharded buckets",
        flag="--dist-ckpt-optim-fully-reshardable",
        const="fully_reshardable",
    )
    #: None → nccl with CUDA, gloo without
    distributed_backend: str | None = flag_field(None, choices=["nccl", "gloo"])
    distributed_timeout_minutes: int = flag_field(
        10, "timeout of the process groups' collectives (Megatron-LM's flag and default)"
    )
    overlap_grad_reduce: bool = flag_field(
        False, "overlap the DP gradient reduce with the backward pass (megatron-core DDP)"
    )
    overlap_param_gather: bool = flag_field(
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

    def disable_sequence_parallel_without_tp(self) -> str | None:
        """Megatron-LM's rule: ``--sequence-parallel`` with TP = 1 is turned off (it would
        change nothing but the numerics); returns the note to report, None when unchanged."""
        if not (self.sequence_parallel and self.tensor_model_parallel_size == 1):
            return None
        self.sequence_parallel = False
        return (
            "--sequence-parallel turned off: tensor model parallelism is disabled "
            "(--tensor-model-parallel-size 1), as Megatron-LM does"
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
        if self.distributed_timeout_minutes < 1:
            raise ConfigError("--distributed-timeout-minutes must be >= 1")
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
