"""The whole run: :class:`RunConfig` (its sections, JSON round trip and cross-section checks)."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_wsm.config.data import DataConfig
from megatron_wsm.config.fields import ConfigError
from megatron_wsm.config.model import ModelConfig
from megatron_wsm.config.optim import OptimizerSettings
from megatron_wsm.config.parallel import ParallelConfig
from megatron_wsm.config.training import TrainingConfig
from megatron_wsm.config.wsm import WSMConfig


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
_REMOVED_FIELDS: dict[str, set[str]] = {}

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
