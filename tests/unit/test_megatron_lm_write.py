"""What we write is what Megatron-LM's loader reads (issue 28, part 2), checked without the
Megatron-LM tree: against the fixture checkpoints its own trainer wrote
(``tests/data/megatron_lm/``, see its README) and its ``--load`` rules (a root with
``latest_checkpointed_iteration.txt`` naming ``iter_<N:07d>``)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import megatron.core  # noqa: F401  (registers the globals Megatron-LM's common states hold)
import pytest

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.checkpoint import common_state, keys, rng
from megatron_wsm.checkpoint.megatron_args import megatron_lm_args
from megatron_wsm.merge import MergeError, merge_checkpoints
from megatron_wsm.testing import synthetic as syn

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "megatron_lm"

#: Fields Megatron-LM's loader reads from a checkpoint's ``args`` (core_v0.16.1,
#: megatron/training/checkpointing.py: ``load_args_from_checkpoint``'s ``_set_arg`` under
#: --use-checkpoint-args, ``check_checkpoint_args``, and the data position in
#: ``load_checkpoint``), limited to what a megatron-wsm model can have.
LOADER_FIELDS = """
num_layers hidden_size ffn_hidden_size seq_length num_attention_heads num_query_groups
group_query_attention kv_channels max_position_embeddings position_embedding_type
add_position_embedding use_rotary_position_embeddings rotary_base rotary_percent
rotary_interleaved add_bias_linear add_qkv_bias squared_relu swiglu
untie_embeddings_and_output_weights normalization apply_query_key_layer_scaling
attention_dropout hidden_dropout num_experts moe_layer_freq moe_ffn_hidden_size
moe_router_topk moe_token_dispatcher_type moe_router_pre_softmax moe_grouped_gemm
moe_shared_expert_intermediate_size moe_router_score_function moe_router_enable_expert_bias
moe_router_topk_scaling_factor tokenizer_type padded_vocab_size make_vocab_size_divisible_by
ckpt_format tensor_model_parallel_size pipeline_model_parallel_size
virtual_pipeline_model_parallel_size expert_model_parallel_size data_parallel_random_init
consumed_train_samples consumed_valid_samples
""".split()

#: The fixtures' model and run as our flags (make_fixtures.MODEL / DATA / TRAIN).
FIXTURE_FLAGS = (
    "--num-layers 2 --hidden-size 16 --ffn-hidden-size 32 --num-attention-heads 4 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --min-lr 1e-3 "
    "--lr-decay-style constant --lr-warmup-iters 0 --weight-decay 0.01 --clip-grad 1.0 "
    "--seed 1234 --train-iters 3 --tokenizer-type NullTokenizer --vocab-size 511 "
    "--make-vocab-size-divisible-by 64 --data-path unused"
).split()


def _fixture_common(name: str, iteration: int = 3) -> dict:
    return common_state.read_common_state(FIXTURES / name / f"iter_{iteration:07d}")


def _our_args(parallel: dict) -> argparse.Namespace:
    cfg, _ = parse_run_config(FIXTURE_FLAGS)
    cfg.model.vocab_size = 512  # what the trainer sets from the tokenizer (511 ids + EOD)
    return megatron_lm_args(
        cfg.to_json(), iteration=3, consumed_samples=12, padded_vocab_size=512, parallel=parallel
    )


def test_args_equal_megatron_lms_for_the_same_model_and_run():
    """Every field Megatron-LM's loader reads has the value Megatron-LM itself wrote for the
    same model, layout and data position (so --use-checkpoint-args builds the same model and
    the sampler resumes at the same sample)."""
    theirs = vars(_fixture_common("ep2_plain")["args"])
    ours = vars(
        _our_args(
            {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
             "expert_model_parallel_size": 2, "context_parallel_size": 1,
             "data_parallel_size": 2, "world_size": 2}
        )
    )  # fmt: skip
    missing = [k for k in LOADER_FIELDS if k in theirs and k not in ours]
    assert not missing, missing
    differ = {
        k: (ours[k], theirs[k]) for k in LOADER_FIELDS if k in theirs and ours[k] != theirs[k]
    }
    assert not differ, differ
    assert ours["consumed_train_samples"] == theirs["consumed_train_samples"] == 12


@pytest.mark.parametrize(
    "fixture, pp, tp, dp, ep",
    [("ep2_plain", 1, 1, 2, 2), ("ep2_distopt", 1, 1, 2, 2), ("tp2_plain", 1, 2, 1, 1)],
)
def test_rng_state_is_sharded_as_megatron_lm_shards_it(fixture, pp, tp, dp, ep):
    """The ``rng_state`` shard names we write for each rank are the ones Megatron-LM wrote for
    the same layout (its loader requests exactly these)."""
    stored = {
        k
        for k in keys.checkpoint_keys(FIXTURES / fixture / "iter_0000003")
        if k.startswith("rng_state/")
    }
    ours = set()
    for world_rank in range(pp * tp * dp):
        # megatron-core's rank order for these layouts: TP fastest, then DP (PP = 1)
        t, d = world_rank % tp, world_rank // tp
        shape, offset, _replica = rng.sharding((0, pp), (t, tp), (d, dp), ep)
        ours.add(rng.shard_key(shape, offset))
    assert ours == stored


# ----------------------------------------------------------------------------- merged output


@pytest.fixture(scope="module")
def window(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = syn.build_test_checkpoints(tmp_path_factory.getbasetemp())
    return [root / name for name in syn.TEST_WINDOW]


COEFS = [0.2, 0.3, 0.5]


def test_merge_named_iter_n_gets_megatron_lms_tracker(window, tmp_path):
    root = tmp_path / "merged_root"
    out = root / "iter_0000030"  # the newest input's iteration
    report = merge_checkpoints(window, COEFS, out)
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert any("--load " + str(root) in n for n in report.notes), report.notes
    # Our tools still read the merged directory itself (manifest inside).
    from megatron_wsm.checkpoint.manager import resolve_load_dir

    assert resolve_load_dir(root) == out and resolve_load_dir(out) == out


def test_merge_output_named_for_another_iteration_is_refused_before_work(window, tmp_path):
    out = tmp_path / "r" / "iter_0000020"
    with pytest.raises(MergeError, match="names iteration 20.*iter_0000030"):
        merge_checkpoints(window, COEFS, out)
    assert not out.exists() and not (tmp_path / "r" / "latest_checkpointed_iteration.txt").exists()


def test_tracker_of_a_training_run_is_never_replaced(window, tmp_path):
    """A merge into a run's save directory (a full checkpoint there) leaves its tracker."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(window[0], run / "iter_0000010")  # a trainer's checkpoint (not merged)
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    report = merge_checkpoints(window, COEFS, run / "iter_0000030")
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert any("tracker not written" in n and "iter_0000010" in n for n in report.notes)


def test_merge_with_another_name_stays_one_directory(window, tmp_path):
    out = tmp_path / "merged"
    report = merge_checkpoints(window, COEFS, out)
    assert not (tmp_path / "latest_checkpointed_iteration.txt").exists()
    assert not any("Megatron-LM" in n and "tracker" in n for n in report.notes)
    assert json.loads((out / "wsm_manifest.json").read_text())["kind"] == "merged"


# ----------------------------------------------------------------------------- reading theirs


def test_data_position_from_our_top_level_or_megatron_lms_args():
    from megatron_wsm.checkpoint.manager import data_position

    ours = {"consumed_samples": 24, "consumed_tokens": 768, "args": argparse.Namespace(
        consumed_train_samples=999)}  # fmt: skip
    assert data_position(ours, 32) == {"consumed_samples": 24, "consumed_tokens": 768}
    theirs = {"args": argparse.Namespace(consumed_train_samples=12, seq_length=32)}
    assert data_position(theirs, 64) == {"consumed_samples": 12, "consumed_tokens": 384}
    no_seq = {"args": argparse.Namespace(consumed_train_samples=12)}
    assert data_position(no_seq, 64) == {"consumed_samples": 12, "consumed_tokens": 768}
    assert data_position({}, 32) == {"consumed_samples": 0, "consumed_tokens": 0}


@pytest.mark.parametrize(
    "fixture, optimizer, prefix",
    [("ep2_plain", "plain", False), ("ep2_distopt", "distributed", True)],
)
def test_optimizer_record_and_request_metadata_from_megatron_lms_content(
    fixture, optimizer, prefix
):
    """Megatron-LM's content metadata says which optimizer wrote the state and how its keys
    were made (``chained_optim_avoid_prefix``): the load request is built with exactly that."""
    from megatron.core import dist_checkpointing

    from megatron_wsm.checkpoint.optimizer_state import saved_optimizer_from_content

    content = dist_checkpointing.load_content_metadata(str(FIXTURES / fixture / "iter_0000003"))
    record = saved_optimizer_from_content(content)
    assert record["optimizer"] == optimizer
    assert record["metadata"]["chained_optim_avoid_prefix"] is True
    stored = keys.checkpoint_keys(FIXTURES / fixture / "iter_0000003")
    assert any(k.startswith("chained_0.") for k in stored) == prefix  # distributed: always


def test_our_content_metadata_keeps_our_requests():
    from megatron_wsm.checkpoint.optimizer_state import (
        optimizer_sharding_metadata,
        saved_optimizer_from_content,
    )

    plain = saved_optimizer_from_content({"wsm_optimizer": "plain"})
    assert plain == {"optimizer": "plain", "sharding": None, "metadata": {}}  # chained_N. keys
    full = {**optimizer_sharding_metadata("fully_reshardable"), "wsm_optimizer": "distributed"}
    record = saved_optimizer_from_content(full)
    assert record["metadata"] == optimizer_sharding_metadata("fully_reshardable")
    assert saved_optimizer_from_content(None)["optimizer"] == "plain"


def test_load_of_a_megatron_lm_save_root_follows_its_tracker(tmp_path):
    from megatron_wsm.checkpoint.manager import CheckpointError, resolve_load_dir

    root = tmp_path / "mlm"
    shutil.copytree(FIXTURES / "ep2_plain", root)
    assert resolve_load_dir(root) == root / "iter_0000003"
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    assert resolve_load_dir(root) == root / "iter_0000002"
    # A tracker naming a missing or linked directory: nothing to resume.
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_load_dir(root)
    (root / "iter_0000007").symlink_to(root / "iter_0000003")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_load_dir(root)


def test_megatron_lm_local_spec_norm_name_is_an_alternative():
    assert keys.stored_names("decoder.layers.pre_mlp_layernorm.weight") == [
        "decoder.layers.mlp.linear_fc1.layer_norm_norm.weight",  # our older local spec
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",  # Megatron-LM's local spec
    ]
    opt = "optimizer.state.exp_avg.decoder.layers.pre_mlp_layernorm.weight"
    assert keys.stored_names(opt)[-1] == (
        "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.layer_norm_weight"
    )
    assert keys.stored_names("decoder.layers.mlp.router.weight") == []


def test_shape_and_layout_read_from_megatron_lms_args():
    from megatron_wsm.checkpoint.manager import model_identity
    from megatron_wsm.checkpoint.megatron_args import (
        parallel_layout_from_args,
        shape_differences,
    )

    args = _fixture_common("tp2_plain")["args"]
    cfg, _ = parse_run_config(FIXTURE_FLAGS)
    identity = model_identity(cfg.model.to_json(), 512)
    assert shape_differences(args, identity) == {}
    wider = model_identity({**cfg.model.to_json(), "hidden_size": 32}, 512)
    assert shape_differences(args, wider) == {"hidden_size": (16, 32)}
    assert shape_differences(args, model_identity(cfg.model.to_json(), 1024)) == {
        "padded_vocab_size": (512, 1024)
    }
    assert shape_differences(None, identity) == {}
    assert parallel_layout_from_args(args) == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 1, "context_parallel_size": 1,
        "data_parallel_size": 1, "world_size": 2,
    }  # fmt: skip
    assert parallel_layout_from_args(argparse.Namespace()) is None


def test_resumed_data_position_reads_megatron_lms_next_batch():
    """After a resume at ``args.consumed_train_samples`` (4 in the fixtures' iteration 1) our
    trainer's next global batch is samples 4-7 of its train dataset; with the fixtures' flags
    those are the token ids megatron-core's own builder gives for the ``GPTDatasetConfig``
    Megatron-LM's ``pretrain_gpt.py`` (core_v0.16.1, ``core_gpt_dataset_config_from_args``) makes
    from them, with its train / valid / test sample counts (3 x 4, 1 x 4, 1 x 4)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers import MegatronTokenizer

    from megatron_wsm.pretrain import build_data

    args = _fixture_common("ep2_plain", 1)["args"]
    start = args.consumed_train_samples
    assert start == 4
    tokenizer = MegatronTokenizer.from_pretrained(
        metadata_path={"library": "null"}, vocab_size=args.vocab_size
    )
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None,
        blend_per_split=None,
        split=args.split,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [12, 4, 4], lambda: True, config
    ).build()
    flags = [f for f in FIXTURE_FLAGS if f not in ("--data-path", "unused")]
    cfg, _ = parse_run_config([*flags, "--mock-data", "--split", "98,1,1", "--eval-iters", "1"])
    ours = build_data(cfg)[0]["train"]
    for i in range(start, start + 4):
        assert ours[i]["tokens"].tolist() == train[i]["tokens"].tolist()
        assert ours[i]["labels"].tolist() == train[i]["labels"].tolist()
