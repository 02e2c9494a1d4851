"""Typed configuration of a training run: the single source of every ``pretrain_moe.py`` flag.

Each field carries its default and, in its metadata, its command-line flag (Megatron-LM's name:
``--tensor-model-parallel-size`` → ``tensor_model_parallel_size``), help text and choices;
``arguments.py`` generates the parser from these classes. No component reads a global ``args``.
Each class validates its own fields (``validate``); :meth:`RunConfig.validate` adds the checks
that need the world size. :meth:`RunConfig.to_json` is what a checkpoint's manifest records and
:meth:`RunConfig.from_json` rebuilds the run from it (tools that need the model back).

One module per section (Megatron-LM's argument groups), so the model, data and training flags
can grow without one file holding all of them:

* ``model`` — :class:`ModelConfig` (architecture and MoE; the ``shape`` fields hash into
  manifests); ``parallel`` — :class:`ParallelConfig`; ``optim`` — :class:`OptimizerSettings`;
  ``data`` — :class:`DataConfig` (tokenizer and datasets); ``training`` —
  :class:`TrainingConfig` (loop, logging, checkpoint flags); ``wsm`` — :class:`WSMConfig`;
* ``run`` — :class:`RunConfig` (the sections together, JSON round trip, cross-section checks);
* ``fields`` — :class:`ConfigError` and :func:`flag_field`, the field helper.

Field metadata keys (read by ``arguments.build_parser``):

* ``help``: help text; ``flag``: the option (default ``--`` + name with dashes; ``None``: no
  flag, set by the program); ``choices``: a list or a zero-argument callable returning one;
* ``group``: help-section title when it differs from the class's ``GROUP``;
* ``store_true`` flags whose value is not the field's own: ``dest`` (the namespace name) and
  ``convert`` (flag value → field value), e.g. ``--bf16`` → ``params_dtype``;
* ``const``: an option that stores this constant (``--dist-ckpt-optim-fully-reshardable``);
* ``nargs``: a word-list option (argparse ``nargs``; strings, each one of ``choices`` when
  given, or numbers for a field typed ``float | list[float]``), e.g. ``--data-path``; a field
  that unwraps a one-element list does so itself (``--moe-router-load-balancing-type``);
* ``shape``: the field decides parameter shapes or routing (hashed into checkpoint manifests).

The package imports the standard library and two small pure modules only (``lr_styles``: the
schedule names; ``accelerators``: the Transformer Engine probe, which imports torch only when
called), so the tools and tests that read a configuration never load megatron-core.
"""

from megatron_wsm.config.data import DATA_SOURCES, DataConfig
from megatron_wsm.config.fields import ConfigError, flag_field
from megatron_wsm.config.model import ModelConfig
from megatron_wsm.config.optim import OptimizerSettings
from megatron_wsm.config.parallel import ParallelConfig
from megatron_wsm.config.run import SECTIONS, RunConfig, shape_fields
from megatron_wsm.config.training import TrainingConfig
from megatron_wsm.config.wsm import WSMConfig

__all__ = [
    "DATA_SOURCES",
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerSettings",
    "ParallelConfig",
    "RunConfig",
    "TrainingConfig",
    "WSMConfig",
    "flag_field",
    "shape_fields",
]
