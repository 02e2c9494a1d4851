"""Megatron-LM launch flags: accepted with meaning, accepted without effect (reported once),
or refused before anything starts with every offender in one message."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_wsm.arguments import build_parser, parse_run_config
from megatron_wsm.megatron_flags import (
    ACCEPTED_VALUES,
    NO_EFFECT,
    UNSUPPORTED,
    unknown_flag_report,
)
from megatron_wsm.megatron_lm_options import MEGATRON_LM_COMMIT, OPTIONS

LAUNCH = Path(__file__).resolve().parents[1] / "data" / "megatron_lm" / "launch"
#: the launch scripts' shell variables -> test values
SHELL_VARS = {
    "TOKENIZER_MODEL": "tok/tokenizer.model",
    "DATA_PATH": "data/corpus_text_document",
    "CHECKPOINT_PATH": "runs/ckpt",
}


def _expand(line: str) -> list[str]:
    """A flag line's words as bash would pass them (``${V:-"d"}`` -> d, ``$V`` -> value)."""
    line = re.sub(r'\$\{(\w+):-"([^"]*)"\}', lambda m: m.group(2), line)
    line = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: SHELL_VARS[m.group(1) or m.group(2)], line)
    return shlex.split(line)


def launch_argv(name: str) -> list[str]:
    lines = (LAUNCH / name).read_text().splitlines()
    assert MEGATRON_LM_COMMIT in lines[1]  # the header names the commit of the source
    return [w for line in lines if line.startswith("--") for w in _expand(line)]


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        parse_run_config(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_one_message_lists_every_offender_with_its_reason(capsys):
    err = _refusal(
        [
            "--fp16",  # Megatron-LM, refused with its own reason
            "--moe-use-upcycling",  # Megatron-LM, not supported (generic reason)
            "--decoder-first-pipeline-num-layers", "2",  # its value is not a stray
            "--lr-decay-iter", "5",  # a typo: Megatron-LM does not know it either
            "--num-layers", "2",  # a valid flag between the offenders
            "--tensorboard-dirr=x",
        ],
        capsys,
    )  # fmt: skip
    lines = [line.strip() for line in err.splitlines()]
    assert "4 flag(s) refused" not in err and "5 flag(s) refused" in lines[0]
    assert lines[1:] == [
        "--fp16: a Megatron-LM flag; " + UNSUPPORTED["--fp16"],
        "--moe-use-upcycling: a Megatron-LM flag; not supported by megatron-wsm yet",
        "--decoder-first-pipeline-num-layers: a Megatron-LM flag; "
        + UNSUPPORTED["--decoder-first-pipeline-num-layers"],
        "--lr-decay-iter 5: unknown to Megatron-LM as well; did you mean --lr-decay-iters?",
        "--tensorboard-dirr: unknown to Megatron-LM as well; did you mean --tensorboard-dir?",
    ]


def test_report_skips_values_by_megatron_lm_arity():
    known = {"--lr"}
    # --recompute-modules takes '+' words, --fp8-format one, a negative number is a value.
    report = unknown_flag_report(
        ["--recompute-modules", "a", "b", "--fp8-format", "-1", "stray", "--zzzz"], known
    )
    assert report == [
        "--recompute-modules: a Megatron-LM flag; not supported by megatron-wsm yet",
        "--fp8-format: a Megatron-LM flag; " + UNSUPPORTED["--fp8-format"],
        "'stray': a value without its flag",
        "--zzzz: unknown to Megatron-LM as well",
    ]


def test_prefix_of_a_flag_is_not_that_flag(capsys):
    # argparse's abbreviations are off, as in Megatron-LM: --num-layer is not --num-layers.
    err = _refusal(["--num-layer", "2"], capsys)
    assert "--num-layer 2: unknown to Megatron-LM as well; did you mean --num-layers?" in err


def test_no_effect_flags_take_megatron_lm_syntax_and_are_reported_once(capsys):
    cfg, _ = parse_run_config(
        [
            "--use-mcore-models", "--timing-log-option", "minmax", "--tp-comm-overlap",
            "--no-persist-layer-norm", "--attention-backend", "flash", "--lr", "2e-3",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if line.startswith("note: accepted, no effect here:")]
    assert len(notes) == 5 and len(set(notes)) == 5
    assert any(n.startswith("note: accepted, no effect here: --timing-log-option minmax: ")
               for n in notes)  # fmt: skip
    assert cfg.optim.lr == 2e-3  # the flag after a valued one is still parsed


def _recompute(*flags: str) -> dict:
    from megatron_wsm.model import build_transformer_config

    cfg, _ = parse_run_config(list(flags))
    cfg.training.validate(1)
    t = build_transformer_config(
        cfg.model, cfg.parallel, overrides=cfg.training.transformer_overrides()
    )
    return {k: getattr(t, k) for k in ("recompute_granularity", "recompute_method",
                                      "recompute_num_layers", "recompute_modules")}  # fmt: skip


def test_recompute_flags_reach_megatron_core_as_megatron_lm_maps_them():
    assert _recompute()["recompute_granularity"] is None
    # --recompute-activations = selective, megatron-core's default module core_attn
    assert _recompute("--recompute-activations") == {
        "recompute_granularity": "selective", "recompute_method": None,
        "recompute_num_layers": None, "recompute_modules": ["core_attn"],
    }  # fmt: skip
    got = _recompute("--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1")  # fmt: skip
    assert (got["recompute_granularity"], got["recompute_method"]) == ("full", "uniform")
    got = _recompute("--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                     "mlp", "--moe-layer-recompute")  # fmt: skip
    assert got["recompute_modules"] == ["core_attn", "mlp", "moe"]  # megatron-core adds moe


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recompute-granularity", "full"], "needs --recompute-method uniform|block"),
        (["--recompute-activations", "--recompute-num-layers", "2"], "full only"),
        (["--recompute-method", "block"], "need --recompute-granularity full"),
        (["--recompute-activations", "--recompute-modules", "attn"], "--recompute-modules attn"),
    ],
)
def test_recompute_misuse_is_refused_before_start(flags, message):
    from megatron_wsm.config import ConfigError

    cfg, _ = parse_run_config(flags)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.training.validate(1)


def test_no_effect_values_that_would_matter_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--ckpt-format", "torch"])
    assert "invalid choice: 'torch'" in capsys.readouterr().err


def test_tables_name_megatron_lm_options_only():
    for option in [*NO_EFFECT, *UNSUPPORTED, *ACCEPTED_VALUES]:
        assert option in OPTIONS, option
    ours = {s for a in build_parser()._actions for s in a.option_strings}
    # A refused flag must not also be one the parser takes.
    assert not set(UNSUPPORTED) & ours


def test_sequence_parallel_without_tp_is_turned_off_with_a_note(capsys):
    cfg, _ = parse_run_config(["--sequence-parallel"])
    assert not cfg.parallel.sequence_parallel
    assert "--sequence-parallel turned off" in capsys.readouterr().out
    cfg, _ = parse_run_config(["--sequence-parallel", "--tensor-model-parallel-size", "2"])
    assert cfg.parallel.sequence_parallel


def test_training_and_logging_flags_of_megatron_lm():
    cfg, _ = parse_run_config(
        ["--optimizer", "adam", "--distributed-timeout-minutes", "7", "--log-throughput"]
    )
    assert cfg.optim.optimizer == "adam"
    assert cfg.parallel.distributed_timeout_minutes == 7
    with pytest.raises(SystemExit):
        parse_run_config(["--optimizer", "sgd"])
    assert parse_run_config([])[0].parallel.distributed_timeout_minutes == 10  # Megatron-LM's


@pytest.mark.parametrize(
    "name",
    ["mixtral_8x7b.flags", "Qwen3-30B-A3B.flags", "DeepSeek-V2-Lite.flags", "DeepSeek-R1.flags"],
)
def test_megatron_lm_launch_scripts_parse(name, capsys):
    """Each reference script's flags, verbatim: no refusal; the values land in the config."""
    argv = launch_argv(name)
    cfg, _ = parse_run_config(argv)
    words = dict(zip(argv, [*argv[1:], None], strict=True))
    assert cfg.model.num_layers == int(words["--num-layers"])
    assert cfg.model.hidden_size == int(words["--hidden-size"])
    assert cfg.model.num_experts == int(words["--num-experts"])
    assert cfg.model.moe_router_topk == int(words["--moe-router-topk"])
    assert cfg.training.micro_batch_size == int(words["--micro-batch-size"])
    assert not cfg.parallel.sequence_parallel  # every script gives it with TP = 1
    notes = capsys.readouterr().out
    assert "--use-mcore-models" in notes and "--sequence-parallel turned off" in notes


def test_mixtral_script_training_and_logging_values():
    cfg, _ = parse_run_config(launch_argv("mixtral_8x7b.flags"))
    o, t = cfg.optim, cfg.training
    assert (o.lr, o.min_lr, o.lr_decay_iters, o.lr_decay_style) == (1e-4, 1e-5, 320000, "cosine")
    assert (o.weight_decay, o.clip_grad, o.lr_warmup_iters) == (0.1, 1.0, 500)
    assert (t.log_interval, t.eval_interval, t.eval_iters) == (1, 1000, 10)
    assert t.no_load_optim and t.no_load_rng and t.tensorboard_dir == "runs/ckpt/tensorboard"
    assert (t.wandb_project, t.wandb_exp_name) == ("Mixtral", "Mixtral_8x7B")


@pytest.mark.slow
def test_recompute_trains_to_the_same_losses(data_cache, tmp_path):
    """Full and selective recomputation (dropout on: the RNG state must be replayed) give the
    losses of a run that keeps its activations, bit for bit."""
    from megatron_wsm.testing.config import TINY_MODEL
    from megatron_wsm.testing.launch import losses, run_pretrain

    common = [*TINY_MODEL, "--train-iters", "3", "--hidden-dropout", "0.1",
              "--attention-dropout", "0.1", "--data-cache-dir", data_cache]  # fmt: skip
    runs = {
        "none": [],
        "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"],
        "selective": ["--recompute-activations", "--recompute-modules", "core_attn", "moe"],
    }  # fmt: skip
    got = {k: losses(run_pretrain([*common, *v], tmp_path / f"{k}.json")) for k, v in runs.items()}
    assert len(got["none"]) == 3
    assert got["full"] == got["none"] and got["selective"] == got["none"]


def test_pretrain_moe_refuses_before_starting_anything(tmp_path):
    """The command itself: exit status 2, the one message, no traceback, nothing written."""
    import subprocess
    import sys

    from megatron_wsm.testing.launch import env

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "pretrain_moe.py"), "--fp16", "--swiglu", "--no-such-flag",
         "--save", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "2 flag(s) refused, nothing was started" in proc.stderr
    assert "--fp16: a Megatron-LM flag" in proc.stderr
    assert "--no-such-flag: unknown to Megatron-LM as well" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--no-masked-softmax-fusion", "masked_softmax_fusion"),
        ("--no-bias-dropout-fusion", "bias_dropout_fusion"),
    ],
)
def test_no_fusion_flags_turn_the_fusion_off_where_it_would_be_on(flag, field):
    """On a machine whose kernels import (stated, not probed: this one has no CUDA) the fusion
    is on, and Megatron-LM's ``--no-…-fusion`` switch turns it off."""
    from megatron_wsm.model import build_transformer_config
    from megatron_wsm.model.fusions import FusionKernels

    kernels = FusionKernels(cuda=True, masked_softmax=True, triton=True)

    def built(*flags: str) -> bool:
        cfg, _ = parse_run_config(list(flags))
        overrides = cfg.training.transformer_overrides()
        return getattr(build_transformer_config(cfg.model, cfg.parallel, kernels, overrides), field)

    assert built() is True
    assert built(flag) is False
