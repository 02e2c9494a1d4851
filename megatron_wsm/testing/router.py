"""megatron-core 0.16.1's MoE router on a CPU-only torch without Transformer Engine.

Two problems, both in megatron-core, neither in our code:

1. ``moe_utils.te_general_gemm`` is imported only inside ``try: import transformer_engine``, so
   without TE the name is undefined and ``RouterGatingLinearFunction.forward`` raises NameError
   at ``if te_general_gemm is not None``. Defining it as None selects the plain
   ``torch.mm`` / ``torch.addmm`` branch.
2. ``Router.gating`` unconditionally moves CPU router weights to ``torch.cuda.current_device()``,
   which asserts on a CPU-only torch. The replacement is the same function minus that move
   (only when CUDA is unavailable).
"""

from __future__ import annotations

from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)


def patch_router_for_cpu(monkeypatch: Any = None) -> None:
    """Apply both patches: through pytest's ``monkeypatch`` (undone after the test), or, with
    None, for the life of the process (a spawned worker)."""
    import torch
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import Router

    def setattr_(obj: Any, name: str, value: Any) -> None:
        if monkeypatch is None:
            setattr(obj, name, value)
        else:
            monkeypatch.setattr(obj, name, value, raising=False)

    setattr_(moe_utils, "te_general_gemm", None)
    if torch.cuda.is_available():
        return

    def cpu_gating(self: Router, input: torch.Tensor) -> torch.Tensor:
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        return moe_utils.router_gating_linear(input, self.weight, self.bias, router_dtype)

    setattr_(Router, "gating", cpu_gating)
