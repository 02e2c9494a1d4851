"""Fixtures shared by the distributed tests."""

from pathlib import Path

import pytest

from megatron_wsm.testing import synthetic as syn


@pytest.fixture(scope="module")
def window(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The synthetic torch_dist window checkpoints (w10, w20, w30), oldest first."""
    root = syn.build_test_checkpoints(tmp_path_factory.getbasetemp())
    return [root / name for name in syn.TEST_WINDOW]
