"""Shared pytest setup: repeatable hypothesis draws, GPU tests skipped without CUDA, megatron-core's
CPU import shims in place before any test module imports it."""

import os

# Test modules import megatron.core directly too: its CPU import shims first, as in the package.
import megatron_wsm.mcore_prelude  # noqa: F401

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests draw the same examples on every run (seeded per test): a failure found once is
# found again, and CI never fails on a draw nobody can reproduce. HYPOTHESIS_PROFILE=explore
# searches afresh (random draws, more examples) when looking for new counterexamples.
hypothesis_settings.register_profile("repeatable", derandomize=True, deadline=None)
hypothesis_settings.register_profile("explore", max_examples=1000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One embedded-corpus cache (tokenizer + indexed datasets) shared by all trainer runs."""
    from megatron_wsm.data.prepare import prepare_embedded_data

    path = tmp_path_factory.mktemp("data_cache")
    prepare_embedded_data(path, vocab_size=512, seed=1234)
    return str(path)
