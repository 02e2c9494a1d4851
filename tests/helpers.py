"""Test helpers, re-exported from :mod:`megatron_wsm.testing` (the one home of test support)."""

from megatron_wsm.ports import free_port
from megatron_wsm.testing.config import TINY_MODEL, tiny_run_config
from megatron_wsm.testing.launch import ROOT, losses, run_pretrain, run_script, torchrun_cmd
from megatron_wsm.testing.launch import env as _env

__all__ = [
    "ROOT",
    "TINY_MODEL",
    "_env",
    "free_port",
    "losses",
    "run_pretrain",
    "run_script",
    "tiny_run_config",
    "torchrun_cmd",
]
