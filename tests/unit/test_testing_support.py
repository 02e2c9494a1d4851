"""The shared test support in megatron_wsm.testing: what other tests build on."""

from __future__ import annotations

import socket

from megatron_wsm.ports import free_port
from megatron_wsm.testing.config import TINY_MODEL, tiny_run_config
from megatron_wsm.testing.launch import ROOT, torchrun_cmd


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing else holds it


def test_tiny_run_config_is_the_tiny_moe_plus_extras():
    cfg = tiny_run_config("--train-iters", 3)
    assert cfg.model.num_experts == 4 and cfg.model.hidden_size == 32
    assert cfg.training.train_iters == 3
    assert "--num-experts" in TINY_MODEL


def test_torchrun_cmd_runs_a_script_of_this_checkout():
    cmd = torchrun_cmd("pretrain_moe.py", 2)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-1] == str(ROOT / "pretrain_moe.py") and (ROOT / "pretrain_moe.py").is_file()
