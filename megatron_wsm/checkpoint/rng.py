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

The state is Megatron-LM's (``megatron/training/checkpointing.py`` ``get_rng_state``), so either
trainer resumes the other's: a dict ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``,
``cuda_rng_state``, ``rng_tracker_states`` (plus our ``device``, which Megatron-LM ignores),
stored as a one-element list in a ShardedObject ``rng_state`` of global shape ``(PP, TP)``
(replicated over DP: DP rank 0 writes), or ``(PP, TP, DP)`` with expert parallelism (the
expert-parallel stream differs by EP rank, which lies within DP): :func:`sharding`. Without CUDA
``cuda_rng_state`` is a 16-byte zero placeholder (Megatron-LM's loader sets it unconditionally;
its own CPU runs record the same). Checkpoints of megatron-wsm before this layout hold a
world-shaped ShardedObject (one state per global rank) with our older names (``random``,
``numpy``, ``torch``, ``tracker``, ``cuda``): :func:`normalize` reads both.
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
#: Megatron-LM's names of the saved generator states.
RANDOM, NUMPY, TORCH, CUDA_STATE, TRACKER = (
    "random_rng_state",
    "np_rng_state",
    "torch_rng_state",
    "cuda_rng_state",
    "rng_tracker_states",
)
#: Our names before the states took Megatron-LM's (read by :func:`normalize`).
_OLD_NAMES = {
    "random": RANDOM,
    "numpy": NUMPY,
    "torch": TORCH,
    "cuda": CUDA_STATE,
    "tracker": TRACKER,
}


def normalize(state: Any, dp_rank: int = 0) -> dict[str, Any]:
    """A saved RNG state under Megatron-LM's names, from any layout we read: Megatron-LM's list
    (one dict, or one per DP rank with ``--data-parallel-random-init``: ``dp_rank``'s), its
    dict, or megatron-wsm's older dict (``random``, ``numpy``, ``torch``, ``tracker``,
    ``cuda``). Raises ValueError for anything else."""
    if isinstance(state, (list, tuple)):
        if not state:
            raise ValueError("the checkpoint's RNG state is an empty list")
        state = state[dp_rank] if len(state) > 1 else state[0]
    if not isinstance(state, dict):
        raise ValueError(f"the checkpoint's RNG state is a {type(state).__name__}, not a dict")
    out = {_OLD_NAMES.get(k, k): v for k, v in state.items()}
    missing = [k for k in (RANDOM, NUMPY, TORCH) if k not in out]
    if missing:
        raise ValueError(f"the checkpoint's RNG state lacks {missing}")
    out.setdefault(TRACKER, {})
    return out


def sharding(
    pp: tuple[int, int], tp: tuple[int, int], dp: tuple[int, int], ep_size: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(global shape, offset, replica id) of this rank's ``rng_state`` ShardedObject, as
    Megatron-LM shards it: ``(PP, TP)`` replicated over DP (``dp`` includes context
    parallelism), or ``(PP, TP, DP)`` with expert parallelism. Each of ``pp``, ``tp``, ``dp``
    is (rank, size)."""
    if ep_size > 1:
        return (pp[1], tp[1], dp[1]), (pp[0], tp[0], dp[0]), 0
    return (pp[1], tp[1]), (pp[0], tp[0]), dp[0]


def shard_key(shape: tuple[int, ...], offset: tuple[int, ...]) -> str:
    """The stored key of one ``rng_state`` shard (megatron-core's ``ShardedObject.unique_key``)."""
    return f"rng_state/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


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
    tracker = state.get(TRACKER, state.get("tracker")) or {}
    kinds = {generator_state_kind(v) for v in tracker.values()}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    if not tracker and ("cuda" in state or CUDA_STATE in state):
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
    return {
        DEVICE_KEY: kind,
        RANDOM: random.getstate(),
        NUMPY: np.random.get_state(),
        TORCH: torch.get_rng_state(),
        # Megatron-LM's loader sets it unconditionally: a placeholder without CUDA (never
        # restored: the device kind says CPU).
        CUDA_STATE: (
            torch.cuda.get_rng_state()
            if torch.cuda.is_available()
            else torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8)
        ),
        TRACKER: tracker,
    }


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

    state = normalize(state)
    saved = saved_kind(state)
    current = here()
    same = restores_device_states(saved, current)
    if not same:
        # First: the CPU shim's seeding also seeds torch's CPU generator, restored below.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    random.setstate(state[RANDOM])
    np.random.set_state(state[NUMPY])
    torch.set_rng_state(state[TORCH])
    if same:
        if CUDA_STATE in state and current == CUDA:
            torch.cuda.set_rng_state(state[CUDA_STATE])
        tensor_parallel.get_cuda_rng_tracker().set_states(state[TRACKER])
    elif verbose and _global_rank() == 0:
        print(reseed_note(saved, current, seed), flush=True)
    return same


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
