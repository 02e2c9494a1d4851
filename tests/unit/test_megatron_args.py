"""The ``args`` Namespace our checkpoints carry for Megatron-LM's loader (issue 28, part 2)."""

from __future__ import annotations

import argparse
import io

import torch

from megatron_wsm.checkpoint.common_state import allowed_globals
from megatron_wsm.checkpoint.megatron_args import megatron_lm_args
from megatron_wsm.testing.config import tiny_run_config


def _args(*flags: str) -> argparse.Namespace:
    cfg = tiny_run_config("--train-iters", "6", *flags)
    layout = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
              "expert_model_parallel_size": 1, "data_parallel_size": 1, "world_size": 2}
    return megatron_lm_args(cfg.to_json(), iteration=6, consumed_samples=24,
                            padded_vocab_size=512, parallel=layout)


def test_data_position_shape_and_layout_under_megatron_lm_names():
    a = _args("--num-query-groups", "2")
    assert (a.iteration, a.consumed_train_samples, a.consumed_valid_samples) == (6, 24, 0)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == (2, 32, 4)
    assert a.group_query_attention and a.num_query_groups == 2
    assert a.add_position_embedding is True  # Megatron-LM's default, RoPE or not
    assert (a.num_experts, a.moe_router_topk, a.padded_vocab_size) == (4, 2, 512)
    assert (a.tensor_model_parallel_size, a.world_size) == (2, 2)
    assert a.tokenizer_type == "SentencePieceTokenizer" and a.ckpt_format == "torch_dist"


def test_our_schedule_names_become_megatron_lms():
    assert _args("--lr-decay-style", "stable").lr_decay_style == "constant"
    a = _args("--lr-decay-style", "WSD", "--lr-wsd-decay-style", "1-sqrt",
              "--lr-wsd-decay-iters", "2")
    assert (a.lr_decay_style, a.lr_wsd_decay_style) == ("WSD", "minus_sqrt")


def test_only_plain_values_so_a_restricted_load_reads_it():
    a = _args()
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in vars(a).values())
    buf = io.BytesIO()
    torch.save({"args": a}, buf)
    buf.seek(0)
    with allowed_globals([argparse.Namespace]):
        assert torch.load(buf, weights_only=True)["args"] == a
