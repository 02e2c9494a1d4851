"""Helpers for tests that launch the trainer or tools in fresh processes (torchrun / gloo).

megatron-core keeps process-global state (parallel_state, RNG trackers), so every run gets its
own process(es), like a user's torchrun launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: A tiny MoE that trains in seconds on 2 CPU cores.
TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--vocab-size",
    "512",
    "--log-interval",
    "1",
    "--eval-interval",
    "0",
    "--eval-iters",
    "2",
    "--no-progress-bar",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def torchrun_cmd(script: str, nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / script),
    ]


def run_script(
    script: str, args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a repo script under torchrun; on failure with ``check`` show its output."""
    cmd = torchrun_cmd(script, nproc) + [str(a) for a in args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def run_pretrain(
    args: list[str], out_json: Path, nproc: int = 1, timeout: int = 300
) -> dict[str, Any]:
    """Train with ``pretrain_moe.py`` and return its ``--output-json`` result."""
    run_script("pretrain_moe.py", [*args, "--output-json", str(out_json)], nproc, timeout)
    return json.loads(Path(out_json).read_text())


def losses(result: dict[str, Any]) -> list[float]:
    """Per-iteration training losses of a run result."""
    return [h["loss"] for h in result["train_history"]]
