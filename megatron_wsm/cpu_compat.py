"""Run megatron-core on a machine without CUDA (CPU tensors, ``gloo`` process groups).

megatron-core targets CUDA: it seeds a CUDA RNG tracker, creates tensors with
``device="cuda"`` or ``torch.cuda.current_device()``, uses CUDA streams and events in the MoE
all-to-all dispatcher, and asserts CUDA tensor types in gradient clipping. None of that is
needed to *compute* the same thing on CPU, so this module routes each of those spots to the
CPU. Everything here is

- active only when ``torch.cuda.is_available()`` is false (``apply()`` is a no-op otherwise),
- written against megatron-core 0.16.x and checked with 0.19.2 (``apply()`` warns on another
  version; README.md, "In an NGC PyTorch container", has the per-version table), and
- one named shim per behaviour, so a reader can see what is worked around and drop a shim when
  megatron-core fixes the behaviour upstream.

These are the runtime shims, applied once process groups start (``distributed.py``). The two
that must be in place while ``megatron.core`` is first imported (the triton stub, the eager
``jit_fuser``) are in :mod:`megatron_wsm.mcore_prelude`. The two modules are the only ones of
megatron-wsm that touch megatron-core internals.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch

logger = logging.getLogger(__name__)

#: megatron-core versions the shims were checked against.
TESTED_MCORE_VERSIONS = ("0.16.", "0.19.")

_APPLIED = False

# Global FLOPs-free stand-ins for CUDA synchronisation objects. On CPU every op is synchronous,
# so streams, events and synchronize() have nothing to do.


class _NullSync:
    """What the CPU stand-ins for a CUDA stream and event share: nothing to wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream(_NullSync):
    """A do-nothing ``torch.cuda.Stream`` for CPU: work is synchronous already."""

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent(_NullSync):
    """A do-nothing ``torch.cuda.Event`` for CPU."""

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass


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


def cuda_type_name(type_name: str) -> str:
    """``torch.BFloat16Tensor`` → ``torch.cuda.BFloat16Tensor``: the name a CPU tensor's
    ``type()`` would have on the GPU (other names unchanged)."""
    if type_name.startswith("torch.") and not type_name.startswith("torch.cuda."):
        return "torch.cuda." + type_name[len("torch.") :]
    return type_name


@contextlib.contextmanager
def cuda_type_names() -> Any:
    """While active, ``Tensor.type()`` (no arguments) of CPU tensors reports CUDA type names.

    Only for the constructors listed in :func:`_shim_optimizer_type_checks`: they sort
    parameters into fp32 / 16-bit groups by comparing ``param.type()`` with
    ``torch.cuda.*Tensor`` names and reject anything else. Calls with arguments (conversions)
    go to the real method; outside the block the real method is back.
    """
    real = torch.Tensor.type

    def type_as_on_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return real(self, *args, **kwargs)
        return cuda_type_name(real(self))

    torch.Tensor.type = type_as_on_cuda  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.type = real  # type: ignore[method-assign]


def _shim_optimizer_type_checks() -> None:
    """The mixed-precision and distributed optimizers accept only ``torch.cuda.*Tensor`` params.

    ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` (0.16.1) decide at
    construction, by ``param.type()`` name, which parameters get fp32 main copies, and raise
    ``TypeError`` on CPU tensors. Their constructors run under :func:`cuda_type_names`; nothing
    after construction checks type names (gradient clipping's check is
    :func:`_shim_clip_grads`).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        real_init = cls.__init__
        if getattr(real_init, "_wsm_cpu_shim", False):
            continue

        def init_with_cuda_type_names(
            self: Any, *args: Any, _real: Callable[..., None] = real_init, **kwargs: Any
        ) -> None:
            with cuda_type_names():
                _real(self, *args, **kwargs)

        init_with_cuda_type_names._wsm_cpu_shim = True  # type: ignore[attr-defined]
        cls.__init__ = init_with_cuda_type_names  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- torch Adam + DO
# Not CPU-specific: these fix megatron-core's distributed optimizer whenever it falls back to
# torch's Adam/AdamW (neither Transformer Engine nor apex importable), GPU included. They are
# called around checkpoint loading, not installed by apply().


def _torch_adam_distributed_optimizers(optimizer: Any) -> list[Any]:
    """The ``DistributedOptimizer`` parts of ``optimizer`` that step with torch's Adam/AdamW."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, distrib_optimizer.DistributedOptimizer)]


def init_torch_adam_state(optimizer: Any) -> None:
    """Give a not-yet-stepped distributed optimizer torch Adam's state (zeros, ``step`` 0).

    Building a checkpoint's load request calls ``DistributedOptimizer.state_dict()``, which
    with torch's Adam reads the one ``step`` shared by all parameter states and asserts there
    is exactly one: before the first step there is none, so every resume failed. This creates
    what torch's Adam creates on its first step (the loaded values then overwrite it); the
    parameters are not touched.
    """
    for part in _torch_adam_distributed_optimizers(optimizer):
        inner = part.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if inner.state.get(param):
                    continue
                inner.state[param] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


@contextlib.contextmanager
def loading_torch_adam_state(optimizer: Any) -> Any:
    """Wrap ``optimizer.load_state_dict`` of a distributed optimizer on the torch-Adam path.

    Three bugs of megatron-core 0.16.1 there break a resume:

    - ``load_state_dict`` puts ONE ``step`` tensor into every parameter's state, and torch's
      Adam increments each state's ``step`` in place: the shared counter advanced once per
      parameter per iteration;
    - the ``dp_reshardable`` reload then copies the ``step`` of the *requesting* optimizer
      (0 before the first step) over it, so bias correction restarted;
    - the ``fully_reshardable`` reload leaves ``step`` out of the loaded tensors but copies
      every key of the state, ``step`` included (``KeyError: 'step'``).

    Inside the block a missing ``step`` is skipped; on exit every parameter gets its own
    ``step`` from the loaded parameter groups (where ``DistributedOptimizer.state_dict``
    stores it for torch's Adam).
    """
    parts = _torch_adam_distributed_optimizers(optimizer)
    for part in parts:
        # An instance attribute: the class method stays as it is for everything else.
        part._set_main_param_and_optimizer_states = _skip_missing_step(part)
    try:
        yield
    finally:
        for part in parts:
            part.__dict__.pop("_set_main_param_and_optimizer_states", None)
    for part in parts:
        inner = part.optimizer
        for group in inner.param_groups:
            step = group.get("step")
            if step is None:
                raise RuntimeError("distributed optimizer state has no step after loading")
            for param in group["params"]:
                state = inner.state.get(param)
                if state:
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _skip_missing_step(part: Any) -> Callable[[Any, dict[str, Any]], None]:
    """``part._set_main_param_and_optimizer_states`` that leaves ``step`` alone when the
    loaded tensors have none (restored afterwards by :func:`loading_torch_adam_state`)."""
    real = type(part)._set_main_param_and_optimizer_states

    def set_states(model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = part.model_param_group_index_map[model_param]
        main_param = part.optimizer.param_groups[group_index]["params"][group_order]
        state = part.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            real(part, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


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
    _shim_optimizer_type_checks()
    _APPLIED = True
    logger.info("megatron-wsm: CPU compatibility shims active (no CUDA)")
    return True
