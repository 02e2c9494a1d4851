"""A held-out split smaller than one global batch is a bad configuration (exit 2, one line),
not a traceback: ``training.evaluate`` raises :class:`ConfigError` before touching the model."""

from __future__ import annotations

import types

import pytest

from megatron_wsm.config import ConfigError, RunConfig
from megatron_wsm.training import evaluate


def test_whole_split_smaller_than_a_global_batch_is_a_config_error() -> None:
    cfg = RunConfig()
    cfg.training.global_batch_size = 8
    cfg.training.eval_iters = 0  # tools/evaluate.py's default: the whole split
    # The model is never reached: a stand-in without one fails loudly if it were.
    comp = types.SimpleNamespace(cfg=cfg, datasets={"valid": list(range(6))}, model=None)
    with pytest.raises(ConfigError, match="6 samples, fewer than one global batch"):
        evaluate(comp, "valid")  # type: ignore[arg-type]


def test_main_reports_config_errors_with_exit_code_2() -> None:
    """pretrain.main turns a ConfigError into exit code 2 (the path evaluate.py relies on)."""
    import inspect

    from megatron_wsm import pretrain

    source = inspect.getsource(pretrain.main)
    assert "except (ConfigError" in source and "return 2" in source
