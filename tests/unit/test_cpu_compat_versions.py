"""The import-time shims of megatron_wsm.mcore_prelude: megatron-core >= 0.18 imports triton on
`import megatron.core`, which CPU builds of torch do not carry (checked for real with the 0.19.2
wheel, the README's per-version table; here the gate and the stub themselves), and the eager
jit_fuser while megatron-core is imported without CUDA."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from megatron_wsm import mcore_prelude


@pytest.mark.parametrize(
    ("version", "imports_triton"),
    [("0.16.1", False), ("0.17.0", False), ("0.18.0", True), ("0.19.2", True), ("1.0.0", True),
     ("0.19.0rc1", True), ("dev", False)],
)
def test_triton_gate_reads_the_installed_version(monkeypatch, version, imports_triton):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert mcore_prelude.megatron_core_imports_triton() is imports_triton


def test_triton_gate_without_megatron_core(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert mcore_prelude.megatron_core_imports_triton() is False


def test_stub_stands_in_for_the_kernel_module_and_refuses_to_run(monkeypatch):
    name = mcore_prelude.TRITON_KERNEL_MODULE
    monkeypatch.delitem(sys.modules, name, raising=False)
    mcore_prelude.stub_triton_kernels()
    stub = sys.modules[name]
    # exactly the names megatron-core's moe/paged_stash.py imports from it
    assert set(stub.__all__) == {"GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel",
                                 "paged_stash_pop_kernel"}
    with pytest.raises(RuntimeError, match="need triton"):
        stub.paged_stash_copy_kernel()
    # an already imported (real) module is never replaced
    real = object()
    monkeypatch.setitem(sys.modules, name, real)
    mcore_prelude.stub_triton_kernels()
    assert sys.modules[name] is real
    monkeypatch.delitem(sys.modules, name)


def test_megatron_core_imported_through_us_on_cpu_uses_eager_jit_fuser():
    """On a machine without CUDA, megatron-core's ``jit_fuser`` (``torch.compile``) becomes the
    plain function while ``megatron.core`` is imported (whichever of our modules imports it),
    TorchDynamo/Inductor are not imported at all, and ``torch.compile`` is itself again."""
    import subprocess

    code = (
        "import sys, torch\n"
        "original = torch.compile\n"
        "import megatron_wsm.model\n"
        "from megatron.core import jit\n"
        "from megatron.core.transformer.moe import router\n"
        "assert not torch.cuda.is_available()\n"
        "assert jit.jit_fuser is megatron_wsm.mcore_prelude._eager, jit.jit_fuser\n"
        "assert torch.compile is original\n"
        "fn = router.TopKRouter._apply_expert_bias\n"
        "assert not hasattr(fn, '_torchdynamo_orig_callable'), fn\n"
        "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("version", ["0.15.0", "0.20.0", ""])
def test_eager_jit_fuser_is_inert_outside_the_checked_versions(version):
    import torch

    original = torch.compile
    with mcore_prelude.eager_jit_fuser(version):
        assert torch.compile is original


def test_eager_jit_fuser_restores_torch_compile_even_when_the_import_fails():
    import torch

    original = torch.compile
    with pytest.raises(ImportError), mcore_prelude.eager_jit_fuser("0.16.1"):
        assert torch.compile is mcore_prelude._eager
        assert mcore_prelude._eager(len) is len and mcore_prelude._eager()(len) is len
        raise ImportError("broken extension")
    assert torch.compile is original
