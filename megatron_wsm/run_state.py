"""What the training loop and its callbacks share: the run's objects and position, and what
one step reports. Kept apart from ``training.py`` so that the callbacks (``callbacks.py`` and
its implementations) can name these types without importing the loop that calls them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_wsm.config import RunConfig


@dataclasses.dataclass
class TrainState:
    """Where the run is: restored from and saved to full checkpoints."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


@dataclasses.dataclass
class Components:
    """The megatron-core objects of a run, built once by ``pretrain.setup``."""

    cfg: RunConfig
    transformer_config: Any
    model: list[Any]  # megatron-core DistributedDataParallel chunks
    optimizer: Any
    scheduler: Any
    vocab_size: int
    datasets: dict[str, Any]
    state: TrainState
    load_tracker: Any = None  # moe_metrics.ExpertLoadTracker when metrics are on
    last_lr: float = 0.0  # LR of the step just taken (the scheduler has moved on)
    #: What setup loaded (CheckpointManager.load's answer, or an in-memory merge's).
    loaded: dict[str, Any] | None = None

    @property
    def num_microbatches(self) -> int:
        import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core, as everywhere)

        from megatron.core import parallel_state

        t = self.cfg.training
        return t.global_batch_size // (
            t.micro_batch_size * parallel_state.get_data_parallel_world_size()
        )

    @property
    def tokens_per_iteration(self) -> int:
        return self.cfg.tokens_per_iteration


@dataclasses.dataclass
class StepResult:
    """What one training iteration reports."""

    loss: float
    grad_norm: float | None
    learning_rate: float
    skipped: bool
    seconds: float
