"""The config dataclasses as the single source of the flags, their validation and JSON round
trip (a checkpoint manifest's run info, read back by tools/evaluate.py)."""


import pytest

from megatron_wsm.arguments import build_parser, parse_run_config
from megatron_wsm.checkpoint.manager import model_identity
from megatron_wsm.checkpoint.manifest import CheckpointManifest
from megatron_wsm.cli.evaluate import config_from_run_info
from megatron_wsm.config import SECTIONS, ConfigError, ModelConfig, ParallelConfig, RunConfig


def test_parser_defaults_are_the_dataclass_defaults() -> None:
    cfg, _ = parse_run_config([])
    assert cfg == RunConfig()


def test_every_flag_lands_in_exactly_one_field() -> None:
    dests = [a.dest for a in build_parser()._actions if a.dest != "help"]
    assert len(dests) == len(set(dests))
    cfg, _ = parse_run_config(["--vocab-size", "5000"])
    assert cfg.data.vocab_size == 5000
    assert cfg.model.vocab_size is None  # the tokenizer's size, set by the trainer


def test_derived_flags() -> None:
    cfg, _ = parse_run_config(["--bf16", "--no-progress-bar", "--num-experts", "0"])
    assert cfg.model.params_dtype == "bf16" and not cfg.training.progress_bar
    assert cfg.training.moe_metrics and cfg.model.num_experts is None
    assert cfg.model.max_position_embeddings == cfg.model.seq_length == 128
    cfg, _ = parse_run_config(["--seq-length", "64", "--lr-wsd-decay-style", "minus_sqrt"])
    assert cfg.model.max_position_embeddings == 64
    assert cfg.optim.lr_wsd_decay_style == "minus_sqrt"


def test_run_config_json_round_trip_keeps_bf16_and_dispatcher() -> None:
    cfg, _ = parse_run_config(
        ["--bf16", "--moe-token-dispatcher-type", "allgather", "--seed", "7", "--save", "s"]
    )
    back = RunConfig.from_json(cfg.to_json())
    assert back == cfg
    evaluated = config_from_run_info(cfg.to_json())
    assert evaluated.model == cfg.model and evaluated.data == cfg.data
    assert evaluated.training.seed == 7 and evaluated.training.save is None


def test_from_json_reads_old_run_info_and_refuses_unknown_keys() -> None:
    old = {
        "model": {**ModelConfig(num_layers=3).to_json(), "vocab_size": 4000},
        "seq_length": 128,
        "data_path": None,
        "tokenizer_model": "t.model",
        "vocab_size": 2048,
        "split": "90,9,1",
        "seed": 5,
    }
    cfg = RunConfig.from_json(old)
    assert cfg.model.num_layers == 3 and cfg.data.tokenizer_model == "t.model"
    assert cfg.data.vocab_size == 2048 and cfg.data.split == "90,9,1"
    assert cfg.training.seed == 5
    # Dropped once as unused, back as Megatron-LM's flag: old manifests read with its meaning.
    assert RunConfig.from_json({"training": {"exit_on_missing_checkpoint": True}}) != RunConfig()
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_json({"lr": 1.0})
    with pytest.raises(ValueError, match=r"unknown fields \['num_layer'\].*newer megatron-wsm"):
        RunConfig.from_json({"model": {"num_layer": 2}})


def test_flags_override_a_base_config_and_unset_flags_keep_it() -> None:
    base, _ = parse_run_config(
        ["--bf16", "--sequence-parallel", "--tensor-model-parallel-size", "2", "--num-layers", "6"]
    )  # TP 2: with TP 1, --sequence-parallel is turned off (Megatron-LM's rule)
    cfg, _ = parse_run_config(["--num-layers", "8"], base)
    assert cfg.model.num_layers == 8
    assert cfg.model.params_dtype == "bf16" and cfg.parallel.sequence_parallel
    assert cfg.model.hidden_size == base.model.hidden_size


def test_manifest_without_run_info_rebuilds_shapes() -> None:
    model = ModelConfig(num_layers=3, vocab_size=1000)
    ident = model_identity(model.to_json(), 1024)

    class Manifest:
        extra: dict = {}
        model_config = ident

    cfg = config_from_run_info(CheckpointManifest.run_info(Manifest()))  # type: ignore[arg-type]
    assert cfg.model.num_layers == 3 and cfg.data.vocab_size == 1000


def test_model_identity_keys_are_the_shape_fields() -> None:
    ident = model_identity(ModelConfig().to_json(), 128)
    assert set(ident) == {
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "max_position_embeddings", "num_experts", "moe_ffn_hidden_size",
        "moe_router_topk", "position_embedding_type", "normalization",
        "untie_embeddings_and_output_weights", "vocab_size", "padded_vocab_size",
    }


def test_each_section_validates_itself() -> None:
    with pytest.raises(ConfigError, match="--moe-router-topk 5"):
        ModelConfig(moe_router_topk=5).validate(ParallelConfig(), 1, cuda=False)
    for name, cls in SECTIONS.items():
        assert callable(cls.validate), name
