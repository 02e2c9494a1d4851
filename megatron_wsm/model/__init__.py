"""Build the GPT model (dense or MoE) from megatron-core's own parts, as Megatron-LM does.

The model is megatron-core's ``GPTModel`` with the layer specs of megatron-core's
``get_gpt_decoder_block_spec`` (dense and MoE layers by ``--moe-layer-freq``, multi-latent or
standard attention, qk-layernorm), the Transformer Engine spec when TE and CUDA are usable and
the local one otherwise. One module per concern:

* ``transformer_config`` — :func:`build_transformer_config`: ``ModelConfig`` →
  ``TransformerConfig`` / ``MLATransformerConfig`` (Megatron-LM's
  ``core_transformer_config_from_args``);
* ``spec`` — :func:`build_layer_spec`: the block spec, with the local spec's checkpoint keys
  made equal to TE's;
* ``norm`` — :class:`SequenceParallelTorchNorm`: the local spec's torch norm refuses
  ``sequence_parallel`` (which megatron-core requires for MoE with TP > 1); this one is the
  same norm with its weights marked sequence-parallel and named like TE's;
* ``gpt`` — :func:`build_gpt_model`;
* ``vocab`` — :func:`padded_vocab_size` (Megatron-LM's padding), :func:`model_vocab_rows` (a
  checkpoint's recorded rows at another TP size);
* ``fusions`` — which fused kernels to switch on, host or device initialisation;
* ``init`` — :func:`layout_independent_init`.
"""

from megatron_wsm.accelerators import transformer_engine_usable
from megatron_wsm.model.fusions import (
    FusionKernels,
    cpu_initialization,
    decide_fusions,
    probe_fusion_kernels,
)
from megatron_wsm.model.gpt import build_gpt_model
from megatron_wsm.model.init import layout_independent_init
from megatron_wsm.model.norm import SequenceParallelTorchNorm
from megatron_wsm.model.spec import build_layer_spec, local_keys_map
from megatron_wsm.model.transformer_config import (
    activation_kwargs,
    build_transformer_config,
    transformer_config_kwargs,
)
from megatron_wsm.model.vocab import model_vocab_rows, padded_vocab_size, padding_mismatch_hint

__all__ = [
    "FusionKernels",
    "SequenceParallelTorchNorm",
    "activation_kwargs",
    "build_gpt_model",
    "build_layer_spec",
    "build_transformer_config",
    "cpu_initialization",
    "decide_fusions",
    "layout_independent_init",
    "local_keys_map",
    "model_vocab_rows",
    "padded_vocab_size",
    "padding_mismatch_hint",
    "probe_fusion_kernels",
    "transformer_config_kwargs",
    "transformer_engine_usable",
]
