"""Multi-latent attention on the local spec: megatron-core's ``DotProductAttention`` with the
query/key and value head widths that ``MLASelfAttention`` passes.

megatron-core 0.16's MLA hands its core attention ``k_channels`` (q/k head width: no-RoPE +
RoPE part) and ``v_channels`` (``--v-head-dim``); Transformer Engine's attention takes them,
the local ``DotProductAttention`` does not (its ``__init__`` has no such arguments, so the local
MLA spec fails to build: "unexpected keyword argument 'k_channels'"). Its arithmetic already
follows the tensors' head widths; only the output width (heads × ``kv_channels``) and the
default softmax scale (1/√kv_channels) come from ``kv_channels``. MLA always passes its own
softmax scale (with YaRN's mscale), so the adapter only sets ``kv_channels`` to the value head
width for the output reshape.
"""

from __future__ import annotations

import copy
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention


class MLADotProductAttention(DotProductAttention):
    """``DotProductAttention`` that accepts MLA's ``k_channels`` / ``v_channels``."""

    def __init__(
        self,
        config: TransformerConfig,
        *args: Any,
        k_channels: int | None = None,
        v_channels: int | None = None,
        softmax_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if softmax_scale is None and k_channels is not None:
            softmax_scale = k_channels**-0.5  # what TE's attention uses for k_channels
        if v_channels is not None and v_channels != config.kv_channels:
            # a shallow copy (no __post_init__ rerun): only the output width differs
            config = copy.copy(config)
            config.kv_channels = v_channels
        super().__init__(config, *args, softmax_scale=softmax_scale, **kwargs)


def allow_local_mla() -> None:
    """Let megatron-core 0.16's ``MLASelfAttention`` build with local linears where Transformer
    Engine is absent.

    ``megatron.core.extensions.transformer_engine`` imports without TE (its classes are
    placeholders), so ``multi_latent_attention`` sets ``HAVE_TE = True`` and then calls
    ``isinstance(self.linear_proj, TELinear)`` with a placeholder that is no type (TypeError).
    That check only picks an fp8/fp4 memory saving of TE's linear; where TE is not usable its
    answer is "no", which ``HAVE_TE = False`` gives.
    """
    from megatron.core.transformer import multi_latent_attention

    from megatron_wsm.accelerators import transformer_engine_usable

    if not transformer_engine_usable() and not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False
