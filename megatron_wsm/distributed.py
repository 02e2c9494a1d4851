"""Process groups: the one place that starts and stops torch.distributed and parallel_state."""

from __future__ import annotations

import datetime
import os
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_wsm import cpu_compat
from megatron_wsm.config import ParallelConfig
from megatron_wsm.ports import free_port
from megatron_wsm.process_guard import die_with_launcher


def init_distributed(
    parallel: ParallelConfig, seed: int, timeout_minutes: int | None = None
) -> None:
    """Start the default process group (from torchrun's env, or a 1-process group) and
    megatron-core's model-parallel groups, and seed the model-parallel RNG streams.

    ``timeout_minutes``: default ``--distributed-timeout-minutes``."""
    if timeout_minutes is None:
        timeout_minutes = parallel.distributed_timeout_minutes
    if not torch.cuda.is_available():
        cpu_compat.apply()
    die_with_launcher()  # a SIGKILLed torchrun must not leave its ranks waiting in collectives
    backend = parallel.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # Plain `python pretrain_moe.py`: a world of one on a free local port.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed(barrier_first: bool = True) -> None:
    """Tear down model-parallel groups and the default group (safe to call twice).

    The barrier lets every rank finish its collectives first: a gloo peer torn down while the
    other is still in an operation aborts that process. Skip it on error paths, where a peer
    may never arrive.
    """
    if barrier_first and dist.is_initialized():
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """Global rank (0 when torch.distributed is not started)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """World size (1 when torch.distributed is not started)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Barrier over the whole world, a no-op without torch.distributed."""
    if dist.is_initialized():
        dist.barrier()


def all_ranks_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (a collective; all ranks call it).

    Lets one rank's local verdict (rank 0 checking a checkpoint) decide for all, so no peer
    waits forever in a barrier the failing rank never reaches.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag  # one rank: its verdict is everyone's (and a collective costs ~0.1 ms)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

