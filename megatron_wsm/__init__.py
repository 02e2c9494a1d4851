"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge."""

import importlib.metadata
import importlib.util
import warnings

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, that the optional GPU accelerators are
# missing; on CPU that is expected (we use its local layers), so say it once ourselves instead.
for _message in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


def _megatron_core_imports_triton() -> bool:
    """megatron-core >= 0.18 imports triton at ``import megatron.core`` (reads metadata only)."""
    try:
        major, minor = importlib.metadata.version("megatron-core").split(".")[:2]
        return (int(major), int(minor)) >= (0, 18)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


# Before any module imports megatron-core; torch is imported only on that (CPU) path.
if importlib.util.find_spec("triton") is None and _megatron_core_imports_triton():
    from megatron_wsm.cpu_compat import stub_triton_kernels

    stub_triton_kernels()
