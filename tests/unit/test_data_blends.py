"""Megatron-LM's data flags (blends, per-split paths, data-args files, mock data) through
megatron-core's BlendedMegatronDatasetBuilder: parsing, refusals, sample counts and the samples
themselves compared with megatron-core built as Megatron-LM's pretrain_gpt.py builds it."""

from __future__ import annotations

from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from megatron_wsm.config import ConfigError
from megatron_wsm.data.blends import megatron_num_samples
from megatron_wsm.data.datasets import datasets_from_flags
from megatron_wsm.data.tokenizers import tokenizer_from_config
from megatron_wsm.testing.config import tiny_run_config

MOCK = ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511")


def _megatron_lm_config(tokenizer, seq_length: int, seed: int, **fields) -> GPTDatasetConfig:
    """GPTDatasetConfig as Megatron-LM's core_gpt_dataset_config_from_args fills it for
    default flags (core_v0.16.1 pretrain_gpt.py)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        **fields,
    )


def _same_samples(ours, ref, indices) -> None:
    for i in indices:
        a, b = ours[i], ref[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# ----------------------------------------------------------------------------- sample counts


def test_num_samples_follow_megatron_lm_formula() -> None:
    # get_train_valid_test_num_samples: train_iters*gbs, (train_iters//eval_interval+1)*eval_iters
    # *gbs, eval_iters*gbs.
    assert megatron_num_samples(10, 4, 3, 2) == (40, (10 // 3 + 1) * 2 * 4, 8)
    assert megatron_num_samples(10, 4, 0, 2) == (40, 8, 8)  # no periodic eval: the final one
    assert megatron_num_samples(10, 4, 3, 2, eval_only=True) == (40, 8, 8)
    assert megatron_num_samples(10, 4, 3, 0) == (40, None, None)  # whole split, one pass


# ----------------------------------------------------------------------------- mock data


def test_mock_data_is_megatron_cores_mock_dataset_in_megatron_lm_order() -> None:
    cfg = tiny_run_config("--train-iters", 5, "--eval-interval", 2, *MOCK)
    cfg.data.validate()
    tokenizer = tokenizer_from_config(cfg.data)
    t = cfg.training
    sizes = megatron_num_samples(t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters)
    ours = datasets_from_flags(cfg.data, tokenizer, cfg.model.seq_length, t.seed, sizes)
    # Megatron-LM with --mock-data: no blend, split None (megatron-core: 1,1,1), MockGPTDataset.
    ref_cfg = _megatron_lm_config(tokenizer, cfg.model.seq_length, t.seed)
    ref = BlendedMegatronDatasetBuilder(MockGPTDataset, list(sizes), lambda: True, ref_cfg).build()
    for mine, theirs, size in zip(ours, ref, sizes, strict=True):
        assert isinstance(mine, MockGPTDataset)
        assert len(mine) == len(theirs) >= size
        _same_samples(mine, theirs, range(size))


def test_mock_data_needs_a_tokenizer_and_no_other_source(tmp_path: Path) -> None:
    cfg = tiny_run_config("--mock-data")
    with pytest.raises(ConfigError, match="--mock-data needs a tokenizer"):
        cfg.data.validate()
    cfg = tiny_run_config(*MOCK, "--data-path", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="one data source, not --mock-data and --data-path"):
        cfg.data.validate()
