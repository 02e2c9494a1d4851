"""One pipeline stage of megatron-core's ``GPTModel`` (Megatron-LM's ``gpt_builder``)."""

from __future__ import annotations

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_wsm.config import ModelConfig
from megatron_wsm.model.spec import build_layer_spec
from megatron_wsm.model.vocab import padded_vocab_size  # noqa: F401  (its home before vocab.py)


def build_gpt_model(config: TransformerConfig, model: ModelConfig, vocab_size: int) -> GPTModel:
    """One pipeline stage of the GPT model (pre/post process by stage position)."""
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(config, model),
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda(torch.cuda.current_device())
    return gpt
