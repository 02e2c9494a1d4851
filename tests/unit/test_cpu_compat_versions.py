"""The version-gated import shim: megatron-core >= 0.18 imports triton on `import megatron.core`,
which CPU builds of torch do not carry (checked for real with the 0.19.2 wheel, docs/production
notes in the README; here the gate and the stub themselves)."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

import megatron_wsm
from megatron_wsm import cpu_compat


@pytest.mark.parametrize(
    ("version", "imports_triton"),
    [("0.16.1", False), ("0.17.0", False), ("0.18.0", True), ("0.19.2", True), ("1.0.0", True),
     ("0.19.0rc1", True), ("dev", False)],
)
def test_triton_gate_reads_the_installed_version(monkeypatch, version, imports_triton):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert megatron_wsm._megatron_core_imports_triton() is imports_triton


def test_triton_gate_without_megatron_core(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert megatron_wsm._megatron_core_imports_triton() is False


def test_stub_stands_in_for_the_kernel_module_and_refuses_to_run(monkeypatch):
    name = cpu_compat.TRITON_KERNEL_MODULE
    monkeypatch.delitem(sys.modules, name, raising=False)
    cpu_compat.stub_triton_kernels()
    stub = sys.modules[name]
    # exactly the names megatron-core's moe/paged_stash.py imports from it
    assert set(stub.__all__) == {"GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel",
                                 "paged_stash_pop_kernel"}
    with pytest.raises(RuntimeError, match="need triton"):
        stub.paged_stash_copy_kernel()
    # an already imported (real) module is never replaced
    real = object()
    monkeypatch.setitem(sys.modules, name, real)
    cpu_compat.stub_triton_kernels()
    assert sys.modules[name] is real
    monkeypatch.delitem(sys.modules, name)
