"""Flag parsing and fail-fast validation (no processes started)."""

import pytest

from megatron_wsm.arguments import ConfigError, parse_run_config, validate


def _cfg(*argv):
    cfg, _ = parse_run_config(list(argv))
    return cfg


def test_megatron_flag_names_map_to_config():
    cfg = _cfg(
        "--num-layers",
        "4",
        "--hidden-size",
        "128",
        "--num-experts",
        "8",
        "--moe-router-topk",
        "1",
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--lr-decay-style",
        "WSD",
        "--lr-wsd-decay-style",
        "cosine",
        "--lr-wsd-decay-iters",
        "10",
    )
    assert cfg.model.num_layers == 4 and cfg.model.num_experts == 8
    assert cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.optim.lr_decay_style == "WSD" and cfg.optim.lr_wsd_decay_style == "cosine"
    validate(cfg, world_size=2, cuda=False)


def test_default_is_stable_lr():
    assert _cfg().optim.lr_decay_style == "stable"


@pytest.mark.parametrize(
    "argv,world,msg",
    [
        (
            ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
            3,
            "not divisible by TP×PP×CP",
        ),
        (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "--num-experts 3"),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
        (["--global-batch-size", "4", "--micro-batch-size", "4"], 2, "--micro-batch-size × DP"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers 3"),
        (["--context-parallel-size", "2"], 2, "Transformer Engine"),
        (["--data-path", "/nonexistent/x", "--tokenizer-model", "t"], 1, ".bin"),
        (["--tokenizer-model", "/nonexistent.model"], 1, "file not found"),
        (["--save-interval", "5"], 1, "needs --save"),
        (["--wsm-interval", "5"], 1, "--wsm-save"),
        (["--wsm-window", "5", "--save", "x"], 1, "needs --wsm-interval"),
        (["--eval-only"], 1, "needs --load"),
        (["--lr-decay-style", "WSD"], 1, "--lr-wsd-decay-iters"),
        (["--wsm-interval-tokens", "100", "--save", "x"], 1, "multiple of the tokens"),
        (["--save-keep-last", "0", "--save", "x"], 1, "--save-keep-last"),
        (["--eval-iters", "-1"], 1, "--eval-iters"),
        (["--dist-ckpt-optim-fully-reshardable"], 2, "needs --use-distributed-optimizer"),
    ],
)
def test_invalid_configs_fail_with_one_clear_message(argv, world, msg):
    with pytest.raises(ConfigError, match=msg.replace("×", ".").replace("(", r"\(")):
        validate(_cfg(*argv), world_size=world, cuda=False)


def test_bf16_and_distributed_optimizer_are_accepted_without_cuda():
    cfg = _cfg("--bf16", "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable")
    validate(cfg, world_size=2, cuda=False)
    assert cfg.model.params_dtype == "bf16"
    assert cfg.parallel.ckpt_optim_sharding == "fully_reshardable"
    assert _cfg("--use-distributed-optimizer").parallel.ckpt_optim_sharding == "dp_reshardable"


def test_window_interval_in_tokens_converts_to_iterations():
    cfg = _cfg(
        "--wsm-interval-tokens",
        "2048",
        "--global-batch-size",
        "8",
        "--seq-length",
        "128",
        "--save",
        "x",
    )
    validate(cfg, 1, cuda=False)
    assert cfg.wsm.interval_iters(cfg.training.global_batch_size * cfg.model.seq_length) == 2
