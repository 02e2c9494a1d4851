"""Weights & Biases logging (``--wandb-project``): the TensorBoard scalars, mirrored.

Megatron-LM's flags and meanings: ``--wandb-project`` switches it on, ``--wandb-exp-name`` names
the run, ``--wandb-save-dir`` is the local directory (default ``<save>/wandb``),
``--wandb-entity`` the team. The process that writes TensorBoard (global rank 0 here) logs,
with the same tags at the same iterations: :class:`WandbScalars` receives every scalar the
trainer writes to TensorBoard. Tags TensorBoard writes against consumed tokens (``... vs
tokens``) are logged at their iteration and plotted against ``consumed-tokens`` (wandb's
``define_metric``), since a W&B run has one step counter. ``wandb`` is an optional extra
(``pip install -e ".[wandb]"``); it is imported only when the flag is given.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from megatron_wsm import metric_names as names

__all__ = ["WandbScalars", "wandb_dir", "wandb_missing_message"]

#: TensorBoard tags whose step is the consumed-token count, not the iteration.
TOKEN_AXIS_TAGS = (names.LM_LOSS_VS_TOKENS, names.LEARNING_RATE_VS_TOKENS)


def wandb_missing_message() -> str | None:
    """Why ``--wandb-project`` cannot run here (None: wandb imports)."""
    if importlib.util.find_spec("wandb") is not None:
        return None
    return (
        "--wandb-project needs the wandb package: pip install 'megatron-wsm[wandb]' "
        "(or pip install wandb); nothing was started"
    )


def wandb_dir(save_dir: str | None, save: str | None) -> str | None:
    """Megatron-LM's choice: ``--wandb-save-dir``, else ``<save>/wandb`` (None: wandb's own
    default, ``./wandb``, when neither is given)."""
    if save_dir:
        return save_dir
    return os.path.join(save, "wandb") if save else None


class WandbScalars:
    """A W&B run fed with the trainer's TensorBoard scalars, one W&B row per iteration.

    Scalars arrive as ``add(tag, value, iteration)``; those of one iteration are buffered
    and logged together when a later iteration arrives or on :meth:`close` (W&B's step must
    not go back, and an iteration's scalars come from several callbacks)."""

    def __init__(
        self,
        project: str,
        name: str | None,
        directory: str | None,
        entity: str | None,
        config: dict[str, Any],
    ) -> None:
        import wandb

        kwargs: dict[str, Any] = {"project": project, "name": name, "config": config}
        if directory:
            os.makedirs(directory, exist_ok=True)
            kwargs["dir"] = directory
        if entity:
            kwargs["entity"] = entity
        self.run = wandb.init(**kwargs)
        for tag in TOKEN_AXIS_TAGS:
            self.run.define_metric(tag, step_metric=names.CONSUMED_TOKENS)
        self._step: int | None = None
        self._row: dict[str, float] = {}

    def add(self, tag: str, value: float, iteration: int) -> None:
        """One scalar of ``iteration`` (logged with the others of that iteration)."""
        if self._step is not None and iteration != self._step:
            self._commit()
        self._step = iteration
        self._row[tag] = float(value)

    def _commit(self) -> None:
        if self._row and self._step is not None:
            self.run.log(self._row, step=self._step)
        self._row = {}

    def close(self) -> None:
        """Log the last iteration's scalars and finish the run (files written)."""
        self._commit()
        self.run.finish()
