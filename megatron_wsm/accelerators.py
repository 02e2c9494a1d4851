"""Which optional GPU accelerators this machine can use (Transformer Engine on CUDA).

Standard library at import: torch is imported only when :func:`transformer_engine_usable` is
called, so ``config`` can refuse GPU-only flags without loading torch for runs that do not
ask for them. ``model.py`` picks its layer spec with the same probe.
"""

from __future__ import annotations

import importlib.util

#: The note for ``--moe-grouped-gemm`` where Transformer Engine is not usable: the flag only
#: selects the experts' kernel (same model, same checkpoint keys), so it is accepted and the
#: experts run as megatron-core's ``SequentialMLP`` (Megatron-LM's own launch scripts pass it).
GROUPED_GEMM_NO_EFFECT = (
    "accepted, no effect here: --moe-grouped-gemm: the experts' grouped GEMM needs Transformer "
    "Engine on CUDA; they run one after another (megatron-core's SequentialMLP: same model, "
    "same checkpoint keys)"
)

#: The note for ``--moe-grouped-gemm`` with ``--transformer-impl local``: megatron-core's local
#: spec would build its legacy ``GroupedMLP`` (another checkpoint layout), so the experts run as
#: ``SequentialMLP`` there, with the keys of every other run.
GROUPED_GEMM_LOCAL_SPEC = (
    "accepted, no effect here: --moe-grouped-gemm with --transformer-impl local: the experts "
    "run one after another (megatron-core's SequentialMLP, same checkpoint keys; Megatron-LM's "
    "local spec would build its legacy GroupedMLP, another checkpoint layout)"
)


def transformer_engine_usable() -> bool:
    """TE is an optional GPU accelerator: use it only when it imports and CUDA is present."""
    import torch  # here, not at the top: the configuration imports this module

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install must not stop a run: fall back to local layers
        return False
    return True


#: Names recorded in checkpoint manifests for the two layer specs.
SPEC_TE = "transformer_engine"
SPEC_LOCAL = "local"


def uses_transformer_engine(transformer_impl: str = SPEC_TE) -> bool:
    """Whether the model is built with Transformer Engine's layer spec: ``--transformer-impl
    transformer_engine`` (the default) where TE is usable; ``local`` never."""
    return transformer_impl == SPEC_TE and transformer_engine_usable()


def layer_spec_name(transformer_impl: str = SPEC_TE) -> str:
    """Which layer spec ``model.build_layer_spec`` picks on this machine for
    ``--transformer-impl`` (TE's when asked for and usable, else the local one)."""
    return SPEC_TE if uses_transformer_engine(transformer_impl) else SPEC_LOCAL
