"""Import this before megatron-core: its import-time shims for machines without CUDA or triton.

Every module of megatron-wsm that imports ``megatron.core`` (at its top or inside a function)
imports this module first, in an import section of its own above the third-party imports
(``pyproject.toml`` orders it so; ``tests/unit/test_import_weight.py`` checks the rule), so
whichever module an entry point (``pretrain_moe.py``, ``tools/*.py``, ``bench/``, the tests)
loads first, megatron-core is imported with these in place:

- the **triton stub** (:func:`stub_triton_kernels`): megatron-core >= 0.18 imports a module of
  triton kernels on ``import megatron.core``; CPU builds of torch carry no triton, so without
  triton a stand-in is registered first (only then);
- the **eager jit_fuser** (:func:`eager_jit_fuser`): a one-shot import hook wraps the loading
  of ``megatron.core`` so that, without CUDA, its ``jit_fuser`` (``torch.compile``) binds to the
  plain function (~3 s of TorchDynamo/Inductor import per process saved, same arithmetic);
- megatron-core's missing-accelerator warnings, said once per module on import, filtered.

Standard library at import: torch is imported only while ``megatron.core`` itself is being
imported. The pure modules (configuration, merge math, annealing) never import this, so
``import megatron_wsm.config`` installs nothing. The runtime shims (CUDA calls routed to the
CPU) are :mod:`megatron_wsm.cpu_compat`'s ``apply()``, made once process groups start.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

# megatron-core warns at import time, once per module, that the optional GPU accelerators are
# missing; on CPU that is expected (we use its local layers), so it is not repeated per module.
for _message in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


def megatron_core_version() -> str:
    """The installed megatron-core's version from its metadata ("" if absent); imports nothing."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return ""


def megatron_core_imports_triton() -> bool:
    """megatron-core >= 0.18 imports triton at ``import megatron.core`` (reads metadata only)."""
    try:
        major, minor = megatron_core_version().split(".")[:2]
        return (int(major), int(minor)) >= (0, 18)
    except ValueError:
        return False


#: megatron-core >= 0.18 imports triton on ``import megatron.core`` (pipeline_parallel.schedules
#: -> moe.paged_stash -> this module of triton kernels), and CPU builds of torch carry no triton.
TRITON_KERNEL_MODULE = "megatron.core.transformer.moe.ops.paged_stash"


def stub_triton_kernels() -> None:
    """Register a stand-in for megatron-core's triton-only paged-stash kernels (CPU, mcore >= 0.18).

    Called on this module's import, before anything imports megatron-core, and only when triton
    is not importable: the kernels belong to MoE paged stashing (a GPU memory feature
    megatron-wsm never enables), so calling one on CPU raises instead of computing.
    """
    if TRITON_KERNEL_MODULE in sys.modules:
        return
    stub = types.ModuleType(TRITON_KERNEL_MODULE)
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]  # megatron-core 0.18/0.19's value

    def _needs_triton(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged-stash kernels need triton (a GPU build of torch)")

    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = _needs_triton  # type: ignore[attr-defined]
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[TRITON_KERNEL_MODULE] = stub


#: megatron-core versions whose ``megatron.core.jit.jit_fuser`` is ``torch.compile`` (torch >=
#: 2.2), bound once when ``megatron.core`` is imported.
JIT_FUSER_IS_TORCH_COMPILE = ("0.16.", "0.17.", "0.18.", "0.19.")


def _eager(model: Any = None, **kwargs: Any) -> Any:
    """``torch.compile`` stand-in: the function itself (or a decorator returning it)."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def eager_jit_fuser(mcore_version: str) -> Iterator[None]:
    """While ``megatron.core`` is imported on a machine without CUDA, make its ``jit_fuser``
    the plain function instead of ``torch.compile``.

    Why: megatron-core decorates small helpers (the router's expert-bias update, GLU
    activations…) with ``jit_fuser = torch.compile``. On CPU that costs ~3 s per process to
    import TorchDynamo and Inductor, and a Dynamo trace on first call, for no speed-up: eager
    is the same arithmetic. Inert when CUDA is available or for an unchecked version. Entered by
    this module's import hook around ``import megatron.core``.
    """
    import torch  # megatron.core is being imported, which imports torch anyway

    if torch.cuda.is_available() or not mcore_version.startswith(JIT_FUSER_IS_TORCH_COMPILE):
        yield
        return
    original = torch.compile
    torch.compile = _eager  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original


class _EagerJitLoader(importlib.abc.Loader):
    """Runs megatron-core's package import inside :func:`eager_jit_fuser`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with eager_jit_fuser(megatron_core_version()):
            self.inner.exec_module(module)


class _MegatronCoreImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of ``megatron.core`` (whichever module imports it
    first) so the CPU import-time shim is in place exactly while it is imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _EagerJitLoader(spec.loader)
        return spec


def hook_installed() -> bool:
    """Whether the one-shot ``megatron.core`` import hook is waiting (tests)."""
    return any(isinstance(finder, _MegatronCoreImportHook) for finder in sys.meta_path)


# Once, on this module's first import: nothing to do if megatron-core is loaded already (its
# jit_fuser is bound) or not installed (the pure tools run without it).
if importlib.util.find_spec("triton") is None and megatron_core_imports_triton():
    stub_triton_kernels()
if "megatron.core" not in sys.modules and megatron_core_version() and not hook_installed():
    sys.meta_path.insert(0, _MegatronCoreImportHook())
