"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge."""

import importlib.abc
import importlib.metadata
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, that the optional GPU accelerators are
# missing; on CPU that is expected (we use its local layers), so say it once ourselves instead.
for _message in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


def _megatron_core_version() -> str:
    """The installed megatron-core's version from its metadata ("" if absent); imports nothing."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _megatron_core_imports_triton() -> bool:
    """megatron-core >= 0.18 imports triton at ``import megatron.core`` (reads metadata only)."""
    try:
        major, minor = _megatron_core_version().split(".")[:2]
        return (int(major), int(minor)) >= (0, 18)
    except ValueError:
        return False


class _EagerJitLoader(importlib.abc.Loader):
    """Runs megatron-core's package import inside :func:`cpu_compat.eager_jit_fuser`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        from megatron_wsm.cpu_compat import eager_jit_fuser

        with eager_jit_fuser(_megatron_core_version()):
            self.inner.exec_module(module)


class _MegatronCoreImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of ``megatron.core`` (whichever of our modules imports
    it first) so the CPU import-time shim is in place exactly while it is imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _EagerJitLoader(spec.loader)
        return spec


# Before any module imports megatron-core; torch is imported only on that (CPU) path.
if importlib.util.find_spec("triton") is None and _megatron_core_imports_triton():
    from megatron_wsm.cpu_compat import stub_triton_kernels

    stub_triton_kernels()
if "megatron.core" not in sys.modules and _megatron_core_version():
    sys.meta_path.insert(0, _MegatronCoreImportHook())
