"""Run the trainer and tools in fresh processes under torchrun (gloo on CPUs).

megatron-core keeps process-global state (parallel_state, RNG trackers), so every run gets its
own process(es), like a user's torchrun launch. Scripts are named relative to the checkout
holding this package (``pretrain_moe.py``, ``tools/merge_wsm.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from megatron_wsm.ports import free_port

#: The checkout holding this package (scripts are run from here).
ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    """The environment of a child run: this checkout importable, one thread, no warnings."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    out["PYTHONWARNINGS"] = "ignore"
    return out


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
    script: str, args: list[Any], nproc: int = 1, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a repo script under torchrun; on failure with ``check`` show its output."""
    cmd = torchrun_cmd(script, nproc) + [str(a) for a in args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def start_script(
    script: str,
    args: list[Any],
    log_path: Path,
    nproc: int = 1,
    child_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start a repo script under torchrun in a session of its own, output to ``log_path``.

    For runs that are killed (or kill themselves): a file rather than a pipe, since a killed
    rank's helper processes may outlive it holding a pipe open; the own session lets the
    caller reap them all with one ``os.killpg`` (:func:`run_until_exit`).
    """
    with open(log_path, "w") as log:
        return subprocess.Popen(
            torchrun_cmd(script, nproc) + [str(a) for a in args],
            cwd=ROOT,
            env=child_env or env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_until_exit(proc: subprocess.Popen, timeout: int = 300) -> int:
    """Wait for a :func:`start_script` run to exit, then SIGKILL whatever is left of its
    session (helpers of a killed rank); returns the exit code."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_pretrain(
    args: list[str], out_json: Path, nproc: int = 1, timeout: int = 300
) -> dict[str, Any]:
    """Train with ``pretrain_moe.py`` and return its ``--output-json`` result."""
    run_script("pretrain_moe.py", [*args, "--output-json", str(out_json)], nproc, timeout)
    return json.loads(Path(out_json).read_text())


def losses(result: dict[str, Any]) -> list[float]:
    """Per-iteration training losses of a run result."""
    return [h["loss"] for h in result["train_history"]]
