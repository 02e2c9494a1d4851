"""Fixtures shared by the unit tests that build real megatron-core modules in-process."""

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def megatron_world(tmp_path_factory: pytest.TempPathFactory):
    """A 1-process gloo world with megatron-core's parallel state (TP=PP=EP=1), the CPU shims
    applied and the model-parallel RNG seeded; torn down after the module if it made them."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_wsm import cpu_compat

    created_pg = created_mp = False
    if not dist.is_initialized():
        # A file store, not a TCP port: tests running side by side must not collide.
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        created_pg = True
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
        created_mp = True
    cpu_compat.apply()
    model_parallel_cuda_manual_seed(1)
    yield
    if created_mp:
        ps.destroy_model_parallel()
    if created_pg:
        dist.destroy_process_group()
