"""Run megatron-core on a machine without CUDA (CPU tensors, ``gloo`` process groups).

megatron-core targets CUDA: it seeds a CUDA RNG tracker, creates tensors with
``device="cuda"`` or ``torch.cuda.current_device()``, uses CUDA streams and events in the MoE
all-to-all dispatcher, and asserts CUDA tensor types in gradient clipping. None of that is
needed to *compute* the same thing on CPU, so this module routes each of those spots to the
CPU. Everything here is

- active only when ``torch.cuda.is_available()`` is false (``apply()`` is a no-op otherwise),
- written against megatron-core 0.16.x (``apply()`` warns on another version), and
- one named shim per behaviour, so a reader can see what is worked around and drop a shim when
  megatron-core fixes the behaviour upstream.

It is the only module of megatron-wsm that touches megatron-core internals.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: megatron-core versions the shims were checked against.
TESTED_MCORE_VERSIONS = ("0.16.",)

_APPLIED = False

# Global FLOPs-free stand-ins for CUDA synchronisation objects. On CPU every op is synchronous,
# so streams, events and synchronize() have nothing to do.


class _NullStream:
    """A do-nothing ``torch.cuda.Stream`` for CPU: work is synchronous already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent:
    """A do-nothing ``torch.cuda.Event`` for CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _cpu_device(*args: Any, **kwargs: Any) -> torch.device:
    return torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec to the CPU, leave others as they are."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorchProxy(types.ModuleType):
    """A stand-in for the ``torch`` module inside selected megatron-core modules.

    Factory functions there create tensors with ``device="cuda"``; the proxy rewrites that
    device to the CPU and forwards everything else to the real ``torch``. Only the modules listed
    in :func:`_shim_cuda_factories` see it, so the rest of the process is untouched.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            return _device_rewriting(attr)
        if name == "autocast":
            return _cpu_autocast
        return attr


def _device_rewriting(factory: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapped


def _cpu_autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class CpuRNGStatesTracker:
    """CPU replacement for megatron-core's ``CudaRNGStatesTracker``.

    Same contract (named RNG streams that ``fork()`` switches to and back), but the streams
    are states of the CPU default generator. Used for dropout inside tensor-parallel regions and
    for the expert-parallel init stream; checkpointing saves ``get_states()`` as on GPU.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _shim_rng_tracker() -> None:
    """``model_parallel_cuda_manual_seed`` reads/writes CUDA generator states."""
    from megatron.core.tensor_parallel import random as mrandom

    def cpu_model_parallel_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        from megatron.core import parallel_state as ps

        tracker = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        # Same seed offsets as megatron-core's CUDA version, so CPU and GPU runs agree in spirit.
        tp_rank = ps.get_tensor_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()
        etp_rank = ps.get_expert_tensor_parallel_rank()
        torch.manual_seed(seed)
        tracker.add(mrandom.get_data_parallel_rng_tracker_name(), seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(
            mrandom.get_expert_parallel_rng_tracker_name(), seed + 1024 + 100 * ep_rank + etp_rank
        )

    def cpu_initialize_rng_tracker(*args: Any, **kwargs: Any) -> None:
        if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Activation recomputation (CheckpointFunction) saves and restores the CUDA RNG state around
    # the recomputed forward; the CPU generator is covered by torch.get/set_rng_state there.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    mrandom.model_parallel_cuda_manual_seed = cpu_model_parallel_seed
    mrandom.initialize_rng_tracker = cpu_initialize_rng_tracker
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = cpu_model_parallel_seed


def _shim_torch_cuda_namespace() -> None:
    """``torch.cuda.current_device()`` used as a device; streams/events in the MoE dispatcher."""
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NullEvent  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NULL_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    # Tensor.record_stream needs a real CUDA stream; on CPU there is nothing to record.
    torch.Tensor.record_stream = lambda self, stream: None  # type: ignore[method-assign]


def _shim_tensor_cuda_method() -> None:
    """``.cuda()`` calls (optimizer state reload, distributed optimizer) mean "the accelerator"."""

    def cuda_to_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = cuda_to_cpu  # type: ignore[method-assign]


#: megatron-core modules (0.16.1) that create tensors with ``device="cuda"`` on paths we run.
_MODULES_CREATING_CUDA_TENSORS = (
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
)


def _shim_cuda_factories() -> None:
    """Tensors created with ``device="cuda"`` (optimizer, schedules, grad buffers, ...)."""
    import importlib

    proxy = _CpuTorchProxy()
    for name in _MODULES_CREATING_CUDA_TENSORS:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy  # type: ignore[attr-defined]


def _shim_clip_grads() -> None:
    """``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer_mod

    def clip_grad_by_total_norm_cpu(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in parameters:
                grad = getattr(param, attr, None)
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    optimizer_mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu


def _shim_moe_utils() -> None:
    """Two library bugs visible only without TE/CUDA.

    - ``te_general_gemm`` is referenced in the router GEMM but only defined when TE imports
      (NameError without TE): define it as None so the plain matmul path is taken.
    - ``maybe_move_tensor_to_cpu(as_numpy=True)`` returns CPU tensors unchanged, so the
      all-to-all split sizes stay tensors and ``all_to_all_single`` rejects them for EP > 1.
    """
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]

    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def apply() -> bool:
    """Install every CPU shim once; returns True if applied (i.e. CUDA is not available)."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.package_info import __version__ as mcore_version

    if not mcore_version.startswith(TESTED_MCORE_VERSIONS):
        warnings.warn(
            f"megatron_wsm.cpu_compat was checked against megatron-core "
            f"{TESTED_MCORE_VERSIONS}, found {mcore_version}: CPU runs may fail",
            stacklevel=2,
        )
    _shim_torch_cuda_namespace()
    _shim_tensor_cuda_method()
    _shim_rng_tracker()
    _shim_cuda_factories()
    _shim_clip_grads()
    _shim_moe_utils()
    _APPLIED = True
    logger.info("megatron-wsm: CPU compatibility shims active (no CUDA)")
    return True
