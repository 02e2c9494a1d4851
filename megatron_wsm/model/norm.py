"""The local spec's norm, made sequence-parallel capable and named like Transformer Engine's."""

from __future__ import annotations

import dataclasses
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec


class SequenceParallelTorchNorm(torch.nn.Module):
    """RMSNorm / LayerNorm in plain torch that accepts ``config.sequence_parallel``.

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so
    the norm weights see different gradients per rank; megatron-core's
    ``finalize_model_grads`` all-reduces parameters flagged ``sequence_parallel`` over the TP
    group, which is exactly what the flag set here asks for (as Transformer Engine's norms set
    it; the per-head query/key norms are all-reduced by name there, once).

    The parameters sit on this module itself (``weight``, ``bias``), as on Transformer Engine's
    norms, so that checkpoint keys are the TE spec's (``…linear_qkv.layer_norm_weight``,
    ``final_layernorm.weight``) and a checkpoint moves between the specs unchanged. The
    arithmetic is ``torch.nn.functional.rms_norm`` / ``layer_norm``, as ``torch.nn.RMSNorm`` /
    ``LayerNorm`` compute it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.shape = (hidden_size,)
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return torch.nn.functional.rms_norm(hidden, self.shape, self.weight, self.eps)
        return torch.nn.functional.layer_norm(hidden, self.shape, self.weight, self.bias, self.eps)


def replace_norms(spec: Any) -> Any:
    """Return ``spec`` with every local torch norm swapped for the SP-capable one (in place
    where ``spec`` is a ModuleSpec or a dataclass of submodules)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, ModuleSpec):
        spec.module = replace_norms(spec.module)
        if spec.submodules is not None:
            spec.submodules = replace_norms(spec.submodules)
        return spec
    if isinstance(spec, list):
        return [replace_norms(s) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            setattr(spec, field.name, replace_norms(getattr(spec, field.name)))
        return spec
    return spec
