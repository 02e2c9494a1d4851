"""Which megatron-core fused kernels to switch on, and where weights are initialised."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

import torch

from megatron_wsm.accelerators import transformer_engine_usable


@dataclasses.dataclass(frozen=True)
class FusionKernels:
    """Which fused kernels import on this machine (see :func:`probe_fusion_kernels`)."""

    cuda: bool = False
    transformer_engine: bool = False  #: TE imports (fused RoPE, TE spec, grouped GEMM)
    masked_softmax: bool = False  #: megatron's ``scaled_*masked_softmax_cuda`` extensions
    wgrad_accumulation: bool = False  #: apex's ``fused_weight_gradient_mlp_cuda``
    triton: bool = False  #: torch.compile's GPU backend (megatron-core's ``jit_fuser``)


def _imports(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # a broken extension counts as absent: its fusion stays off
        return False
    return True


def probe_fusion_kernels() -> FusionKernels:
    """Try the imports each fusion needs; nothing is enabled that would fail on first use."""
    cuda = torch.cuda.is_available()
    if not cuda:
        return FusionKernels()
    return FusionKernels(
        cuda=True,
        transformer_engine=transformer_engine_usable(),
        masked_softmax=all(
            _imports(m)
            for m in ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
        ),
        wgrad_accumulation=_imports("fused_weight_gradient_mlp_cuda"),
        triton=_imports("triton"),
    )


def decide_fusions(kernels: FusionKernels) -> dict[str, bool]:
    """The megatron-core fusion switches for the kernels that import (a pure function).

    - ``masked_softmax_fusion``: the local spec's softmax calls
      ``scaled_upper_triang_masked_softmax_cuda`` for bf16/fp16 inputs; without that extension
      it must stay off (TE's attention does its own softmax and ignores the switch).
    - ``apply_rope_fusion``: TE's fused RoPE kernel.
    - ``bias_dropout_fusion``: ``torch.compile`` of the bias-dropout-add, which needs triton.
    - ``gradient_accumulation_fusion``: the output layer is megatron-core's own linear even
      under the TE spec, and it refuses the switch without apex's wgrad kernel.
    """
    on = kernels.cuda
    return {
        "masked_softmax_fusion": on and kernels.masked_softmax,
        "apply_rope_fusion": on and kernels.transformer_engine,
        "bias_dropout_fusion": on and kernels.triton,
        "gradient_accumulation_fusion": on and kernels.wgrad_accumulation,
    }


def cpu_initialization(cuda: bool, layout_independent_init: bool) -> bool:
    """Whether megatron-core initialises the weights on the host (``use_cpu_initialization``).

    On CUDA, no: each rank draws its own shard on its GPU (from the RNG tracker's streams),
    which avoids the slow start-up and host-memory peak of building every TP-split weight
    whole on the host. On CPU there is no other device. With ``--layout-independent-init``,
    yes: that option promises a start that does not depend on the layout or the device, and
    host initialisation leaves the RNG tracker's streams untouched (device initialisation
    advances the tensor- and expert-parallel streams by each rank's shard sizes, so dropout
    would draw differently per layout), builds TP-split weights whole (every TP size gets
    slices of one tensor) and computes the rotary frequencies on the host, as a CPU run does.
    """
    return layout_independent_init or not cuda
