"""The RNG state of a full checkpoint, and restoring it on another kind of device.

A full checkpoint holds, per rank, every RNG the run draws from: Python's ``random``, NumPy's,
torch's CPU generator, and megatron-core's RNG tracker (the data-parallel, tensor-parallel and
expert-parallel streams that dropout and weight initialisation fork into), plus the CUDA
generator on a GPU. The tracker's states are *device* generator states: on a GPU, CUDA Philox
states (16 bytes: seed and offset); on CPU (``cpu_compat.CpuRNGStatesTracker``), CPU Mersenne
Twister states (5056 bytes). Neither fits the other's generator: a GPU checkpoint resumed on
CPU would hand 16-byte states to ``torch.set_rng_state`` at the first tracker fork (megatron-core's
attention forks on every forward, dropout or not), and the reverse fails in
``torch.cuda.set_rng_state``.

So the saved state records its device kind (``"device"``: ``"cpu"`` or ``"cuda"``; older
checkpoints without it are recognised by the size of their states), and on load the device
states (tracker, CUDA generator) are restored only on the same kind of device. On another kind
they are re-seeded the way the trainer seeds them at start-up
(``model_parallel_cuda_manual_seed(seed)``: offsets by tensor- and expert-parallel rank), which
is deterministic but not a continuation of the saved streams; one note says so. The
device-independent generators (``random``, NumPy, torch's CPU generator) are restored in every
case.
"""

from __future__ import annotations

import random
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import numpy as np
import torch

CPU = "cpu"
CUDA = "cuda"
#: Byte sizes of a generator's ``get_state()``: torch's CPU Mersenne Twister, and the CUDA
#: Philox generator (seed + offset).
CPU_STATE_BYTES = 5056
CUDA_STATE_BYTES = 16
#: The key under which :func:`capture` records the device kind.
DEVICE_KEY = "device"


def here() -> str:
    """The device kind this process draws its tracker states on."""
    return CUDA if torch.cuda.is_available() else CPU


def generator_state_kind(value: Any) -> str | None:
    """``"cpu"`` / ``"cuda"`` for one saved generator state (a ByteTensor by its size, or a
    ``torch.Generator`` by its device), None when it does not say."""
    if isinstance(value, torch.Generator):
        return CUDA if value.device.type == CUDA else CPU
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
        if value.numel() == CUDA_STATE_BYTES:
            return CUDA
        if value.numel() == CPU_STATE_BYTES:
            return CPU
    return None


def saved_kind(state: dict[str, Any]) -> str | None:
    """The device kind a saved RNG state was drawn on: its ``"device"`` entry, else (older
    checkpoints) what its tracker states' sizes say, else ``"cuda"`` when a CUDA generator state
    was saved. None when nothing tells, or the tracker states disagree."""
    recorded = state.get(DEVICE_KEY)
    if recorded in (CPU, CUDA):
        return recorded
    tracker = state.get("tracker") or {}
    kinds = {generator_state_kind(v) for v in tracker.values()}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    if not tracker and "cuda" in state:
        return CUDA
    return None


def restores_device_states(saved: str | None, current: str) -> bool:
    """Whether the tracker / CUDA generator states saved on ``saved`` can be restored on
    ``current``: only on the same kind of device (an unknown kind is re-seeded)."""
    return saved is not None and saved == current


def capture() -> dict[str, Any]:
    """Every RNG the run draws from, for bitwise resume, with the device kind."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    kinds = {generator_state_kind(v) for v in tracker.values()}
    kind = kinds.pop() if len(kinds) == 1 and None not in kinds else here()
    state: dict[str, Any] = {
        DEVICE_KEY: kind,
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tracker,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def reseed_note(saved: str | None, current: str, seed: int) -> str:
    """The one line printed when the device states are re-seeded instead of restored."""
    origin = f"on {saved.upper()}" if saved else "on an unknown device"
    return (
        f"note: the checkpoint's RNG tracker states were saved {origin}; resuming on "
        f"{current.upper()} they are re-seeded from --seed {seed} as at start-up (random, "
        "NumPy and the CPU generator are restored): dropout draws are deterministic but not "
        "those of an uninterrupted run"
    )


def restore(state: dict[str, Any], seed: int, verbose: bool = True) -> bool:
    """Inverse of :func:`capture`. Returns True when the device states were restored, False
    when they were re-seeded from ``seed`` (another device kind; a note is printed on global
    rank 0 when ``verbose``)."""
    from megatron.core import tensor_parallel

    saved = saved_kind(state)
    current = here()
    same = restores_device_states(saved, current)
    if not same:
        # First: the CPU shim's seeding also seeds torch's CPU generator, restored below.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if same:
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    elif verbose and _global_rank() == 0:
        print(reseed_note(saved, current, seed), flush=True)
    return same


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
